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
