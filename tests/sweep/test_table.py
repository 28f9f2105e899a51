"""The sweep table on run directories written by hand: mean ± sample std over seeds, n, and
failed, unfinished and missing runs shown, not averaged."""
import csv
import io
import json
import statistics

import pytest

from kdengine.sweep import plan_runs, sweep_table, to_markdown, write_tables
from kdengine.sweep.plan import merge_plan
from tests.sweep.fakes import fake_run

TOP1 = {  # (method, seed) -> last-epoch top-1 of teacher and student
    ("dml", 0): (50.0, 40.0), ("dml", 1): (52.0, 41.0), ("dml", 2): (57.0, 45.0),
    ("dml+adm", 0): (55.0, 43.0), ("dml+adm", 1): (53.0, 44.0),  # seed 2: failed; seed 3: missing
}


@pytest.fixture
def sweep(tmp_path):
    runs = plan_runs(["method.name=dml,dml+adm", "train.seed=0,1,2,3"])
    merge_plan(tmp_path, None, runs)
    for run in runs:
        key = (run.values["method.name"], int(run.values["train.seed"]))
        if key in TOP1:
            t, s = TOP1[key]
            fake_run(tmp_path / run.name, run.overrides, {"teacher": t, "student": s, "ensemble": (t + s) / 2})
    fake_run(tmp_path / "method.name=dml_train.seed=3", ["method.name=dml", "train.seed=3"],
             {"teacher": 99.0, "student": 99.0, "ensemble": 99.0}, done=1)  # unfinished: 1 of 2 epochs
    failed = tmp_path / "method.name=dml+adm_train.seed=2"
    fake_run(failed, ["method.name=dml+adm", "train.seed=2"], {"teacher": 0.0, "student": 0.0, "ensemble": 0.0},
             done=1)
    (failed / "sweep-run.json").write_text(json.dumps({"attempts": [
        {"status": "failed", "returncode": 1, "wall_s": 3.0, "error": "kdengine train: error: non-finite loss"}]}))
    return tmp_path


def test_means_stds_and_counts(sweep):
    table = sweep_table(sweep)
    assert table.settings == ["method.name"] and table.tags == ["teacher", "student", "ensemble"]
    dml, adm = table.rows
    assert dml.values == {"method.name": "dml"} and dml.n == 3
    assert dml.counts() == {"completed": 3, "failed": 0, "unfinished": 1, "missing": 0}
    mean, std = dml.stats["teacher"]["last"]
    assert mean == pytest.approx(statistics.fmean([50, 52, 57]))
    assert std == pytest.approx(statistics.stdev([50, 52, 57]))
    # the fake runs rise by one point per epoch: the best is the last
    assert dml.stats["student"]["best"] == pytest.approx(dml.stats["student"]["last"])
    assert adm.n == 2 and adm.counts() == {"completed": 2, "failed": 1, "unfinished": 0, "missing": 1}
    assert adm.stats["student"]["last"] == pytest.approx((43.5, statistics.stdev([43.0, 44.0])))
    assert adm.runs_cell() == "2/4 (1 failed, 1 missing)"


def test_markdown_and_csv(sweep):
    table, paths = write_tables(sweep)
    md = (sweep / "table.md").read_text()
    assert md == to_markdown(table)
    assert "| method.name | n | teacher top-1 (last) |" in md
    assert "| dml | 3 | 53.00 ± 3.61 |" in md
    assert "method.name=dml+adm_train.seed=2: failed: kdengine train: error: non-finite loss" in md
    assert "method.name=dml+adm_train.seed=3: missing (not started)" in md
    assert "method.name=dml_train.seed=3: unfinished after 1/2 epochs" in md
    rows = list(csv.DictReader(io.StringIO((sweep / "table.csv").read_text())))
    teacher = next(r for r in rows if r["method.name"] == "dml+adm" and r["model"] == "teacher")
    assert float(teacher["top1_last_mean"]) == 54.0 and float(teacher["top1_last_std"]) == pytest.approx(1.4142, 1e-4)
    assert teacher["n"] == "2" and teacher["failed"] == "1" and teacher["missing"] == "1" and teacher["planned"] == "4"
    per_run = list(csv.DictReader(io.StringIO((sweep / "runs.csv").read_text())))
    assert len(per_run) == 8 and {r["status"] for r in per_run} == {"completed", "failed", "unfinished", "missing"}
    assert next(r for r in per_run if r["run"] == "method.name=dml_train.seed=2")["student_top1"] == "45"


def test_a_single_finished_run_has_no_std(tmp_path):
    (run,) = plan_runs(["method.name=dml"])
    merge_plan(tmp_path, None, [run])
    fake_run(tmp_path / run.name, run.overrides, {"teacher": 60.0})
    table = sweep_table(tmp_path)
    assert "| all runs | 1 | 60.00 | 60.00 | 1/1 |" in to_markdown(table)


def test_rows_of_several_invocations_name_every_setting_that_differs(tmp_path):
    """A folder planned by two invocations: methods as an axis, then an ablation with method.name
    fixed. Each row names its method (a fixed setting of the second invocation); settings shared by
    every run (train.threads) are no column."""
    main = plan_runs(["train.threads=1", "method.name=dml,dml+adm", "train.seed=0,1"])
    ablation = plan_runs(["train.threads=1", "method.name=dml+adm", "method.options.adm={gamma: 0.0}",
                          "train.seed=0,1"])
    merge_plan(tmp_path, None, main)
    merge_plan(tmp_path, None, ablation)
    for i, run in enumerate(main + ablation):
        fake_run(tmp_path / run.name, run.overrides, {"teacher": 50.0 + i, "student": 40.0 + i, "ensemble": 45.0})
    table = sweep_table(tmp_path)
    assert table.settings == ["method.name", "method.options.adm"]
    rows = {tuple(r.values.values()): r.n for r in table.rows}
    assert rows == {("dml", ""): 2, ("dml+adm", ""): 2, ("dml+adm", "{gamma: 0.0}"): 2}
