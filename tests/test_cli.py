import csv
from pathlib import Path

import pytest
import torch

import kdengine
from kdengine import cli
from kdengine.ops import available_impls


def test_info_report_is_the_library_s():
    from kdengine.info import report

    rows = dict(report())
    assert rows["kdengine"] == kdengine.__version__ and rows["torch"] == torch.__version__
    assert "extension" in rows and "triton" in rows and "ffcv" in rows
    if "cpu" in available_impls(torch.device("cpu")):
        assert rows["compiled backends"] and "MiB held (KDENGINE_CPU_BUFFER_CACHE_MB)" in rows["CPU buffer cache"]


def test_info_reports_build(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "ffcv" in out
    if "cpu" in available_impls(torch.device("cpu")):
        assert "compiled backends" in out and "CPU buffer cache" in out


def test_bench_ops_appends_rows(tmp_path, capsys):
    out_csv = tmp_path / "ops.csv"
    argv = ["bench", "ops", "--cases", "cifar_r32x4_r8x4", "--ops", "feature_mse", "--modes", "fwd,fwdbwd",
            "--providers", "reference-eager", "--repeat", "2", "--output", str(out_csv)]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0  # appends under the same header
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 4
    row = rows[0]
    for column in ("commit", "torch_version", "device_name", "median_ms", "p20_ms", "p80_ms", "gbps",
                   "pct_copy_bw", "speedup_vs_eager"):
        assert row[column] != "", column
    assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
    assert row["speedup_vs_eager"] == "1.0"


def test_bench_ops_writes_to_the_current_directory_by_default(tmp_path, monkeypatch, capsys):
    """As an installed kdengine would: nothing is written next to the package."""
    package_dir = Path(kdengine.__file__).parent
    before = {p: p.stat().st_mtime_ns for p in package_dir.rglob("*.csv")}
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "ops", "--cases", "cifar_r32x4_r8x4", "--ops", "feature_mse", "--modes", "fwd",
                     "--providers", "reference-eager", "--repeat", "1"]) == 0
    written = tmp_path / "kdengine-bench" / "ops.csv"
    assert f"appended 1 rows to {written}" in capsys.readouterr().out
    assert len(list(csv.DictReader(open(written)))) == 1
    assert {p: p.stat().st_mtime_ns for p in package_dir.rglob("*.csv")} == before


@pytest.mark.parametrize("argv, needle", [
    (["--cases", "mnist"], "--cases has unknown names ['mnist']"),
    (["--providers", "fortran"], "--providers has unknown names ['fortran']"),
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["--device", "tpu"], "--device"),
])
def test_bench_rejects_bad_settings_naming_the_flag(capsys, argv, needle):
    assert cli.main(["bench", "ops", *argv, "--no-save"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "info" in capsys.readouterr().out
