"""`kdengine viz` and `kdengine viz report` on the command line."""
import pytest

from kdengine.cli import main


def test_viz_draws_the_chosen_pictures(tiny_runs, tmp_path, capsys):
    run = tiny_runs["dml"]
    assert main(["viz", str(run), "--only", "curves,calibration", "--device", "cpu", "--output",
                 str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "calibration" in out and (tmp_path / "c.png").stat().st_size > 0 and (run / "calibration.json").is_file()
    assert main(["viz", str(run), str(tiny_runs["adm"]), "--only", "curves", "--compare",
                 str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 0


def test_viz_report(tiny_runs, tmp_path, capsys):
    out_file = tmp_path / "r.html"
    assert main(["viz", "report", str(tiny_runs["dml"]), "--device", "cpu", "--images", "2", "--iou-images", "8",
                 "--output", str(out_file)]) == 0
    assert f"wrote {out_file}" in capsys.readouterr().out
    assert "<table" in out_file.read_text()


@pytest.mark.parametrize("argv, message", [
    (["viz", "report"], "give run directories"),
    (["viz", "report", "."], "neither a run directory"),
    (["viz", ".", "--only", "maps,nope"], "choose among"),
    (["viz", "a", "b", "--output", "x.png"], "--compare"),
])
def test_viz_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_ends_with_the_report(tmp_path, monkeypatch, capsys):
    from tests.engine.conftest import TINY

    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path / "cache"))
    base = [o for o in TINY if not o.startswith("train.epochs")] + ["train.epochs=1", "method.name=vanilla",
                                                                     f"train.output_dir={tmp_path}"]
    assert main(["train", "--quiet", "--run-name", "with", *base]) == 0
    report = tmp_path / "with" / "report.html"
    assert f"report: {report}" in capsys.readouterr().out and report.stat().st_size > 0
    assert main(["train", "--quiet", "--no-report", "--run-name", "without", *base]) == 0
    assert "report:" not in capsys.readouterr().out and not (tmp_path / "without" / "report.html").exists()
