"""Planning a sweep: splitting values, the cartesian product, run names, the plan file."""
import json

import pytest

from kdengine.sweep import SweepError, plan_runs, split_values
from kdengine.sweep.plan import load_plan, merge_plan, parse_overrides, run_name


def test_values_split_at_top_level_commas_only():
    assert split_values("dml,dml+adm") == ["dml", "dml+adm"]
    assert split_values("[150,225]") == ["[150,225]"]
    assert split_values("{alpha: 0, beta: 0},{gamma: 0},{}") == ["{alpha: 0, beta: 0}", "{gamma: 0}", "{}"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("5") == ["5"]


def test_cartesian_product_in_order_with_shared_settings():
    runs = plan_runs(["method.name=dml,dml+adm", "train.epochs=6", "train.seed=0,1,2"])
    assert len(runs) == 6
    assert [r.values for r in runs[:4]] == [{"method.name": "dml", "train.seed": "0"},
                                            {"method.name": "dml", "train.seed": "1"},
                                            {"method.name": "dml", "train.seed": "2"},
                                            {"method.name": "dml+adm", "train.seed": "0"}]
    assert runs[3].name == "method.name=dml+adm_train.seed=0"
    assert runs[3].overrides == ("train.epochs=6", "method.name=dml+adm", "train.seed=0")
    assert len({r.name for r in runs}) == 6


def test_a_mapping_axis_and_long_names():
    runs = plan_runs(["method.options.adm={alpha: 0.0, beta: 0.0},{gamma: 0.01}"])
    assert [r.name for r in runs] == ["method.options.adm=alpha-0.0-beta-0.0", "method.options.adm=gamma-0.01"]
    assert runs[0].overrides == ("method.options.adm={alpha: 0.0, beta: 0.0}",)
    long = run_name({"models.0.kwargs": "x" * 300})
    assert len(long) <= 120 and long != run_name({"models.0.kwargs": "x" * 301})
    assert plan_runs(["train.epochs=1"])[0].name == "run"


@pytest.mark.parametrize("overrides, message", [
    (["train.seed"], "key=value"),
    (["train.seed=0,1", "train.seed=2"], "given twice"),
    (["train.seed=0,,1"], "empty value"),
    (["train.seed=1,1"], "twice"),
    (["train.run_name=x"], "set by the sweep"),
    (["train.resume=auto"], "set by the sweep"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(SweepError, match=message):
        parse_overrides(overrides)


def test_a_trailing_comma_makes_a_one_value_axis():
    runs = plan_runs(["method.name=kd,", "train.seed=0,1", "train.epochs=6"])
    assert [r.name for r in runs] == ["method.name=kd_train.seed=0", "method.name=kd_train.seed=1"]
    assert runs[0].overrides == ("train.epochs=6", "method.name=kd", "train.seed=0")
    with pytest.raises(SweepError, match="empty value"):
        parse_overrides(["train.seed=,"])


def test_names_that_collide_are_refused():
    with pytest.raises(SweepError, match="share the directory"):
        plan_runs(["models.0.kwargs={a: 1},{a  : 1}"])


def test_plans_merge_and_refuse_a_changed_run(tmp_path):
    first = plan_runs(["method.name=dml,vanilla", "train.seed=0,1"])
    merge_plan(tmp_path, None, first)
    more = plan_runs(["method.name=dml,vanilla", "train.seed=0,1,2"])
    plan = merge_plan(tmp_path, None, more)
    assert [r.name for r in plan.runs[:4]] == [r.name for r in first] and len(plan.runs) == 6
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"][5]["values"] == {"method.name": "vanilla",
                                                                                      "train.seed": "2"}
    assert len(load_plan(tmp_path).runs) == 6
    with pytest.raises(SweepError, match="another --name"):
        merge_plan(tmp_path, None, plan_runs(["method.name=dml,vanilla", "train.seed=0,1", "train.epochs=3"]))
    with pytest.raises(SweepError, match="--config"):
        merge_plan(tmp_path, "/some/other.yaml", first)
    dry = merge_plan(tmp_path / "dry", None, first, write=False)
    assert len(dry.runs) == 4 and not (tmp_path / "dry").exists()


def test_a_sweep_folder_resumes_with_the_same_experiment_file_at_another_path(tmp_path):
    """A committed sweep resumed from another checkout: the file's bytes decide, not its path."""
    first, moved, other = tmp_path / "a" / "exp.yaml", tmp_path / "b" / "exp.yaml", tmp_path / "c" / "exp.yaml"
    texts = ("train: {epochs: 2}\n", "train: {epochs: 2}\n", "train: {epochs: 3}\n")
    for path, text in zip((first, moved, other), texts):
        path.parent.mkdir()
        path.write_text(text)
    runs = plan_runs(["train.seed=0,1"])
    merge_plan(tmp_path / "sw", str(first), runs)
    plan = merge_plan(tmp_path / "sw", str(moved), runs)
    assert plan.config == str(moved) and load_plan(tmp_path / "sw").config == str(moved)
    with pytest.raises(SweepError, match="is a sweep of --config"):
        merge_plan(tmp_path / "sw", str(other), runs)
