"""`kdengine train`, `kdengine eval` and `kdengine viz` on a tiny run."""
import pytest

from kdengine.cli import main


def test_train_then_eval_then_viz(tiny, tmp_path, capsys):
    assert main(["train", "--quiet", "--run-name", "cli", *tiny]) == 0
    out = capsys.readouterr().out
    assert "dml+adm" in out and "ensemble" in out and "(best)" in out
    run = tmp_path / "runs" / "cli"
    assert main(["eval", str(run / "checkpoint.pt")]) == 0
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
