"""`kdengine sweep` end to end on tiny runs (each a `kdengine train` process): dry run, launch,
resume of an interrupted run, skip of finished runs, failed runs in the table, submitit."""
import subprocess

import pytest

from kdengine.cli import main
from kdengine.sweep import plan_runs, train_command
from tests.engine.conftest import TINY

BASE = [o for o in TINY if not o.startswith("train.epochs")] + ["train.epochs=1"]


@pytest.fixture
def sweep_args(tmp_path, monkeypatch):
    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path / "cache"))
    return ["sweep", "--output-dir", str(tmp_path), "--name", "s", "--quiet"]


def test_sweep_resumes_skips_and_tabulates(sweep_args, tmp_path, capfd):
    axes = ["method.name=vanilla,dml"]
    sweep_dir = tmp_path / "s"
    assert main(sweep_args + axes + BASE + ["--dry-run"]) == 0
    out = capfd.readouterr().out
    assert "2 runs, 2 to run" in out and out.count(": starts") == 2 and "$ " in out and not sweep_dir.exists()

    # a run stopped by hand after 2 of its 6 steps (as Ctrl-C or a time limit would leave it)
    dml = plan_runs(axes + BASE)[1]
    subprocess.run(train_command(dml, sweep_dir, quiet=True) + ["train.max_steps=2"], check=True)
    capfd.readouterr()
    assert main(sweep_args + axes + BASE) == 0
    captured = capfd.readouterr()
    assert "method.name=dml: resumes after epoch 0/1" in captured.out
    assert "resuming" in captured.out + captured.err  # the trainer continued the checkpoint
    assert "| vanilla | 1 |" in captured.out and "| dml | 1 |" in captured.out
    from kdengine.engine import checkpoint as ckpt

    assert ckpt.load(sweep_dir / dml.name / "checkpoint.pt")["global_step"] == 6

    assert main(sweep_args + axes + BASE) == 0
    out = capfd.readouterr().out
    assert "0 to run" in out and out.count("finished: skipped") == 2
    assert (sweep_dir / "table.md").is_file() and (sweep_dir / "table.csv").is_file()

    assert main(["sweep", "table", str(sweep_dir)]) == 0
    assert "| dml | 1 |" in capfd.readouterr().out


def test_failed_runs_are_shown_not_averaged(sweep_args, tmp_path, capfd):
    # kd and dkd need a trained teacher (models.0.checkpoint): their runs fail when they start
    assert main(sweep_args + ["method.name=kd,dkd"] + BASE) == 1
    out = capfd.readouterr().out
    assert "| kd | 0 | – | – |" not in out  # no model ever reported: no model columns at all
    assert "| kd | 0 | 0/1 (1 failed) |" in out and "| dkd | 0 | 0/1 (1 failed) |" in out
    assert "method.name=kd: failed: " in out and "models.0.checkpoint" in out
    assert main(sweep_args + ["method.name=kd,dkd"] + BASE + ["--dry-run"]) == 0
    assert "method.name=kd: failed before" in capfd.readouterr().out


@pytest.mark.slow
def test_submitit_local_executor(sweep_args, tmp_path, capfd):
    pytest.importorskip("submitit")
    assert main(sweep_args + ["--launcher", "submitit", "--cluster", "local", "--executor-param", "timeout_min=10",
                              "method.name=vanilla"] + BASE) == 0
    out = capfd.readouterr().out
    assert "submitted run: job" in out and "| all runs | 1 |" in out
    assert (tmp_path / "s" / "submitit").is_dir()


def test_submitit_set_up_errors_come_first(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    monkeypatch.chdir(tmp_path)
    base = ["sweep", "--launcher", "submitit", "train.seed=0,1"]
    assert main(base + ["--cluster", "nope"]) == 2
    assert "submitit:" in capsys.readouterr().err
    assert main(base + ["--cluster", "local", "--executor-param", "bogus=1"]) == 2
    assert "submitit: Parameter 'bogus'" in capsys.readouterr().err
    assert not any((tmp_path / "sweeps" / "embedded").glob("train.seed=*"))  # nothing ran


@pytest.mark.parametrize("argv, message", [
    (["sweep"], "nothing to sweep"),
    (["sweep", "train.seed"], "key=value"),
    (["sweep", "train.epochz=1,2"], "did you mean 'epochs'"),
    (["sweep", "--config", "nope.yaml", "train.seed=0,1"], "no such file"),
    (["sweep", "table"], "give one sweep folder"),
    (["sweep", "table", "."], "sweep.json"),
    (["sweep", "--launcher", "submitit", "--executor-param", "oops", "train.seed=0,1"], "key=value"),
])
def test_sweep_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_sigterm_stops_the_running_training_with_a_checkpoint(tmp_path, monkeypatch):
    """`timeout` or a scheduler stops the sweep: the training saves a checkpoint, the same command resumes."""
    import signal
    import sys
    import time

    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path / "cache"))
    long = [o for o in BASE if not o.startswith("train.epochs")] + ["train.epochs=200", "method.name=vanilla"]
    command = [sys.executable, "-m", "kdengine", "sweep", "--output-dir", str(tmp_path), "--name", "s", "--quiet",
               *long]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "s" / "run"
    deadline = time.monotonic() + 300
    while not (run / "checkpoint.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert (run / "checkpoint.pt").is_file(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "interrupted: the same command resumes" in out
    from kdengine.sweep import read_status, run_state

    assert read_status(run)["status"] == "interrupted"
    state = run_state(run)
    assert state["status"] == "unfinished" and state["epochs_done"] < 200
    dry = subprocess.run(command + ["--dry-run"], capture_output=True, text=True, check=True).stdout
    assert f"run: resumes after epoch {state['epochs_done']}/200" in dry
