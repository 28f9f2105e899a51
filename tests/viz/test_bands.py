"""Several runs in one plot: grouping by everything but the seed, mean ± sample std."""
import math
import statistics

import pytest

from kdengine.engine import load_config
from kdengine.viz.bands import group_runs, mean_std, plot_runs
from tests.sweep.fakes import fake_run


def _cfg(*overrides):
    return load_config(overrides=["train.device=cpu", *overrides])


def test_groups_are_the_settings_but_the_seed():
    configs = {"a": _cfg("method.name=dml", "train.seed=0", "train.run_name=a"),
               "b": _cfg("method.name=dml", "train.seed=1", "train.run_name=b"),
               "c": _cfg("method.name=dml+adm", "train.seed=0", "train.output_dir=elsewhere")}
    assert group_runs(configs) == {"method.name=dml": ["a", "b"], "method.name=dml+adm": ["c"]}
    two = {"a": configs["a"], "b": configs["b"]}
    assert group_runs(two) == {"all runs": ["a", "b"]}
    assert group_runs(two, seed_key="optim.lr") == {"train.seed=0": ["a"], "train.seed=1": ["b"]}


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, statistics.stdev([1.0, 2.0, 4.0])))
    mean, std = mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)
    assert all(math.isnan(v) for v in mean_std([]))


def test_plot_runs_writes_one_figure(tmp_path):
    runs = [fake_run(tmp_path / f"r{i}", [f"train.seed={i}", f"method.name={m}"], {"teacher": 50 + i, "student": 40})
            for i, m in enumerate(["dml", "dml", "dml+adm"])]
    path = plot_runs(runs, tmp_path / "bands.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
