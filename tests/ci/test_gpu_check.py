"""The one-command GPU validation (.ci/gpu_check.py), exercised without a GPU: stages are recorded
and go on after a failure, a skipped cuda test fails the tests stage, and the output folder holds
at most 8 files with the summary printed last."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "gpu_check.py"


@pytest.fixture()
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(outputs):
    """A ``run`` that answers by the first matching fragment of the command."""
    calls = []

    def run(cmd, log, timeout, env=None):
        calls.append(cmd)
        for fragment, (code, text) in outputs.items():
            if fragment in cmd:
                log.write(text)
                return code, text
        return 0, "ok\n"

    return run, calls


def test_without_a_gpu_only_env_wheels_and_build_run(gpu_check, tmp_path, monkeypatch, capsys):
    run, calls = _fake_run({"import torch, platform": (0, "python 3.11\ntorch 2.13.0 cuda None\ndevice none\n")})
    monkeypatch.setattr(gpu_check, "run", run)
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("total ")
    assert "tests, benches and training were not run: no GPU" in out
    assert not any("pytest -m cuda" in c for c in calls)
    assert len(list(tmp_path.iterdir())) <= 8 and (tmp_path / "summary.txt").exists()


def test_a_failed_stage_is_recorded_and_the_rest_goes_on(gpu_check, tmp_path, monkeypatch, capsys):
    run, calls = _fake_run({
        "import torch, platform": (0, "device NVIDIA H200\ncapability (9, 0)\n"),
        "pytest -m cuda": (0, "SKIPPED [1] tests/ops/test_x.py:3: needs a CUDA GPU\n5 passed, 1 skipped\n"),
        "bench ops": (1, "Traceback\nRuntimeError: boom\n"),
    })
    monkeypatch.setattr(gpu_check, "run", run)
    monkeypatch.setattr(gpu_check, "stage_bench", lambda kind, out, log, env: (kind != "ops", kind))
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "tests" in summary and "1 cuda test(s) skipped" in summary
    assert "bench ops       FAILED" in summary and "bench step      ok" in summary
    assert "train + resume  ok" in summary  # ran after the failures
    assert any("--resume auto" in c for c in calls)
    assert len(list(tmp_path.iterdir())) <= 8
