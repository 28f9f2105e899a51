"""Where benchmark rows go (the current directory, never the installed package) and the commit
they carry (git of the current directory only when it is a kdengine checkout)."""
import csv
import subprocess
from pathlib import Path

import pytest
import torch

import kdengine
from kdengine.bench import results
from kdengine.bench.results import append_rows, default_output, git_commit, provenance

PACKAGE_DIR = Path(kdengine.__file__).resolve().parent
REPO = PACKAGE_DIR.parent


def test_default_output_is_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for suite in ("ops", "data"):
        path = default_output(suite)
        assert path == tmp_path / "kdengine-bench" / f"{suite}.csv"
        assert PACKAGE_DIR not in path.parents


def test_append_rows_creates_the_folder_and_keeps_one_header(tmp_path):
    path = tmp_path / "new" / "rows.csv"
    append_rows(path, [{"a": 1, "b": 2}])
    append_rows(path, [{"a": 3, "b": 4}])
    assert list(csv.DictReader(open(path))) == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    with pytest.raises(ValueError, match="has columns"):
        append_rows(path, [{"a": 5, "c": 6}])


def test_append_rows_widens_the_file_for_new_columns_and_fills_missing_ones(tmp_path):
    path = tmp_path / "rows.csv"
    append_rows(path, [{"a": 1, "b": 2}])
    append_rows(path, [{"a": 3, "b": 4, "c": 5}])  # a newer benchmark version adds a column
    append_rows(path, [{"a": 6, "b": 7}])  # an older writer leaves it empty
    assert list(csv.DictReader(open(path))) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"},
                                                {"a": "6", "b": "7", "c": ""}]


def test_commit_outside_a_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git repository: the package's folder is not asked
    assert git_commit() == "unknown"


def test_commit_of_another_repository_is_not_taken(tmp_path, monkeypatch):
    try:
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git not available")
    monkeypatch.chdir(tmp_path)
    assert git_commit() == "unknown"


def test_commit_of_a_checkout_in_the_current_directory(monkeypatch):
    if not (REPO / ".git").exists():
        pytest.skip("kdengine is not run from a git checkout")
    monkeypatch.chdir(REPO / "tests")  # anywhere inside the checkout
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_commit().removesuffix("-dirty") == head


def test_installed_commit_comes_from_pip_metadata(tmp_path, monkeypatch):
    class Dist:
        def read_text(self, name):
            assert name == "direct_url.json"
            return '{"url": "https://example.org/kdengine.git", "vcs_info": {"vcs": "git", "commit_id": "%s"}}' % (
                "0123456789abcdef" * 2 + "01234567")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(results.importlib.metadata, "distribution", lambda name: Dist())
    assert git_commit() == "0123456789ab"


def test_provenance_columns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDENGINE_CPU_BUFFER_CACHE_MB", "0")
    row = provenance(torch.device("cpu"))
    assert row["commit"] == "unknown" and row["kdengine_version"] == kdengine.__version__
    assert row["device"] == "cpu" and row["device_name"] and row["cpu_buffer_cache_mb"] == 0
