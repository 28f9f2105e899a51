"""`kdengine train`, `kdengine eval` and `kdengine viz` on a tiny run."""
import pytest
import torch

from kdengine.cli import main
from kdengine.engine import checkpoint as ckpt
from kdengine.engine.datasets import ffcv_available


def test_train_then_eval_then_viz(tiny, tmp_path, capsys):
    assert main(["train", "--quiet", "--run-name", "cli", *tiny]) == 0
    out = capsys.readouterr().out
    assert "dml+adm" in out and "ensemble" in out and "(best)" in out
    run = tmp_path / "runs" / "cli"
    assert main(["eval", str(run)]) == 0  # a run directory, as viz takes
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "ensemble" in out
    assert main(["viz", str(run), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_method_flag_and_tensorboard(tiny, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    argv = ["train", "--quiet", "--method", "vanilla", "--run-name", "tb", "--epochs", "1",
            *[o for o in tiny if not o.startswith("train.tensorboard")], "train.tensorboard=true"]
    assert main(argv) == 0
    assert "vanilla" in capsys.readouterr().out
    run = tmp_path / "runs" / "tb"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert "val/ensemble/top1" in acc.Tags()["scalars"]


@pytest.mark.parametrize("argv, message", [
    (["train", "train.epochz=1"], "did you mean 'epochs'"),
    (["train", "--config", "nope.yaml"], "no such file"),
    (["eval", "missing.pt"], "does not exist"),
    (["viz", "."], "no metrics.jsonl"),
])
def test_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- a new user's first hour


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    err = "\n".join(line for line in err.splitlines() if "\r" not in line and "%|" not in line)  # FFCV's bars
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_resume_auto_continues_the_numbered_stopped_run_not_the_finished_one(tiny, tmp_path, capsys):
    """As reported: a finished default-named run, a second one numbered -2 stopped by
    train.max_steps; the stop message's command continues -2, and the finished run's record stays."""
    one_epoch = [o for o in tiny if not o.startswith("train.epochs")] + ["train.epochs=1"]
    assert main(["train", "--quiet", *one_epoch]) == 0
    runs = tmp_path / "runs"
    (finished,) = runs.iterdir()
    record = (finished / "config.yaml").read_text()
    saved = (finished / "checkpoint.pt").stat().st_mtime_ns
    capsys.readouterr()

    assert main(["train", "--quiet", *one_epoch, "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    stopped = runs / f"{finished.name}-2"
    assert "train.max_steps=2 reached: stopped in epoch 1/1 after step 2 of" in out
    command = out[out.index("Continue with kdengine train "):].splitlines()[0]
    assert command.endswith(f"train.max_steps=null --quiet --resume auto --run-name {stopped.name}")
    assert "no epoch finished" in out
    assert f"run directory: {stopped} (config.yaml, checkpoint.pt)" in out  # only what exists

    assert main(["train", "--quiet", *one_epoch, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {stopped} in epoch 1/1 at step 2" in out
    assert (finished / "config.yaml").read_text() == record
    assert (finished / "checkpoint.pt").stat().st_mtime_ns == saved
    assert ckpt.load(stopped / "checkpoint.pt")["epoch"] == 1
    assert "validation after epoch 1 of 1" in out and "curves.png" in out


def test_progress_off_a_terminal_is_a_line_per_log_interval_and_epoch(tiny, tmp_path, capsys):
    assert main(["train", "--run-name", "lines", *tiny]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("data: generating the embedded dataset (96 + 32 images of 16 px)")  # a fresh cache
    steps = [line for line in lines if line.startswith("epoch ") and " step " in line]
    assert steps and steps[0].startswith("epoch 1/2  step 2/6  ") and "img/s  loss " in steps[0]
    assert any(len(line) > 80 and line.rstrip().endswith("]") for line in steps)  # whole, not cut at 80 columns
    assert [line.split("  val")[0] for line in lines if "val top-1" in line] == ["epoch 1/2", "epoch 2/2"]
    assert main(["train", "--run-name", "again", "--epochs", "1", *tiny]) == 0
    # cached .beton files: nothing to say (without FFCV the arrays are generated in memory each run)
    assert capsys.readouterr().out.startswith("data:") == (not ffcv_available())


def test_the_bar_keeps_the_epoch_and_the_loss_at_80_columns(tiny):
    import io

    from rich.console import Console

    from kdengine.engine import Trainer, load_config

    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    trainer = Trainer(load_config(overrides=tiny + ["train.run_name=bar"]), console=console)
    progress = trainer._progress()
    with progress:
        task = progress.add_task("epoch 1/2", total=12, completed=0, info="")
        progress.update(task, completed=4, info="1,234 img/s  loss 5.772  ce/0 1.402  ce/1 1.407  kl/0 0.020  "
                                                 "kl/1 0.020  co/0 0.010")
        progress.refresh()
    last = out.getvalue().split("\r")[-1]
    assert "epoch 1/2" in last and "4/12" in last and "loss 5.772" in last


@pytest.mark.parametrize("argv, needles", [
    (["train", "train.device=cuda"], ["train.device=cuda", "no CUDA device", "train.device=cpu"]),
    (["train", "--device", "cuda"], ["--device cuda", "no CUDA device", "--device cpu"]),
    (["train", "train.epochs=abc"], ["train.epochs must be an integer, got 'abc'"]),
])
def test_settings_errors_are_one_line_naming_the_setting_or_flag(argv, needles, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    err = _one_line_error(capsys, *needles)
    assert "full_key" not in err and "object_type" not in err


def test_eval_on_a_machine_without_cuda_says_which_setting(tiny, tmp_path, capsys, monkeypatch):
    from omegaconf import OmegaConf

    from kdengine.engine import load_config

    run = tmp_path / "gpu_run"
    cfg = OmegaConf.to_container(load_config(overrides=tiny))
    cfg["train"]["device"] = "cuda"  # trained on a GPU
    ckpt.save_atomic({"config": cfg, "models": [], "epoch": 1, "step_in_epoch": 0}, run / "checkpoint.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", str(run)]) == 2
    _one_line_error(capsys, "train.device=cuda", "train.device=cpu")


def test_unwritable_output_folders_are_one_line_errors(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    outside = [o for o in tiny if not o.startswith("train.output_dir")]
    assert main(["train", "--quiet", *outside, f"train.output_dir={blocker}/runs"]) == 2
    _one_line_error(capsys, f"train.output_dir={blocker}/runs", "cannot write the run directory", "writable")
    assert main(["train", "--quiet", *outside, "--output-dir", f"{blocker}/runs"]) == 2
    _one_line_error(capsys, f"--output-dir {blocker}/runs")

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 0, "split": "val", "teacher/top1": 10.0, "teacher/loss": 2.0}\n')
    assert main(["viz", str(run), "--output", str(blocker / "c.png")]) == 2
    _one_line_error(capsys, "cannot write", "--output")


def test_debug_shows_the_traceback(capsys):
    assert main(["train", "train.epochs=abc", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("kdengine train: error: override")


def test_overrides_and_flags_in_any_order(capsys):
    # the last override is read (and refused: a typo), not taken for an unknown command
    assert main(["train", "method.name=dml", "--epochs", "1", "train.seed=1", "train.epochz=1"]) == 2
    _one_line_error(capsys, "did you mean 'epochs'")
    with pytest.raises(SystemExit):
        main(["train", "method.name=dml", "--lr", "0.1"])
    assert "unrecognized arguments: --lr" in capsys.readouterr().err


def test_eval_takes_a_run_directory_and_its_arguments_in_any_order(tiny, tmp_path, capsys):
    run = tmp_path / "runs" / "ev"
    assert main(["train", "--quiet", "--run-name", "ev", "--epochs", "1", *tiny]) == 0
    capsys.readouterr()
    assert main(["eval", "train.device=cpu", str(run)]) == 0
    out = capsys.readouterr().out
    assert "after epoch 1" in out and "ensemble" in out
    assert main(["eval", str(tmp_path)]) == 2
    _one_line_error(capsys, "holds no checkpoint.pt")
