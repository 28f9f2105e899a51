"""`kdengine bench step`: option checks, and rows whose numbers come from the steps they time."""
from __future__ import annotations

import csv

import pytest
import torch

from kdengine.bench import step as bench_step
from kdengine.cli import main
from kdengine.errors import SettingError


def test_make_config_defaults_and_bad_names():
    config = bench_step.make_config(device="cpu")
    assert list(config.cases) == list(bench_step.DEFAULT_CASES["cpu"])
    assert list(config.providers) == list(bench_step.PROVIDERS) and list(config.methods) == list(bench_step.METHODS)
    with pytest.raises(SettingError, match="cases has unknown names \\['cifar'\\]"):
        bench_step.make_config(device="cpu", cases=["cifar"])
    with pytest.raises(SettingError, match="providers has unknown names"):
        bench_step.make_config(device="cpu", providers=["fast"])
    with pytest.raises(SettingError, match="steps_per_window must be at least 1"):
        bench_step.make_config(device="cpu", steps_per_window=0)
    if not torch.cuda.is_available():
        with pytest.raises(SettingError, match="sees no CUDA device"):
            bench_step.make_config(device="cuda")


def test_rows_for_each_provider_with_consistent_ratios(tmp_path):
    out = tmp_path / "step.csv"
    config = bench_step.make_config(device="cpu", cases=["embedded"], methods=["kd+adm"],
                                    providers=["eager-fp32", "kdengine"], repeat=2, steps_per_window=1, warmup=1,
                                    batch=8, output=out)
    rows = bench_step.run(config)
    assert [r["provider"] for r in rows] == ["eager-fp32", "kdengine"]
    by = {r["provider"]: r for r in rows}
    assert by["eager-fp32"]["speedup_vs_eager_fp32"] == 1.0
    ratio = by["eager-fp32"]["median_ms_per_step"] / by["kdengine"]["median_ms_per_step"]
    assert by["kdengine"]["speedup_vs_eager_fp32"] == pytest.approx(ratio, rel=1e-2)
    for r in rows:
        assert r["img_per_s"] == pytest.approx(8 / (r["median_ms_per_step"] * 1e-3), rel=1e-2)
        assert r["gflop_per_step"] > 0 and r["mfu_pct"] > 0 and r["batch"] == 8
        assert r["dtype"] == "float32" and r["layout"] == "contiguous" and r["cuda_graph"] is False
    with open(out) as f:
        assert len(list(csv.DictReader(f))) == 2


def test_flops_of_a_step_grow_with_the_batch():
    small = bench_step._Provider("eager-fp32", bench_step.StepCase("t", "resnet8", "resnet8", 2, 16, 10, "cifar"),
                                 "dml+adm", torch.device("cpu"))
    large = bench_step._Provider("eager-fp32", bench_step.StepCase("t", "resnet8", "resnet8", 4, 16, 10, "cifar"),
                                 "dml+adm", torch.device("cpu"))
    f2 = bench_step.count_step_flops(small.step, small.images, small.labels)
    f4 = bench_step.count_step_flops(large.step, large.images, large.labels)
    assert f4 == pytest.approx(2 * f2, rel=0.01)


def test_cli_profile_prints_the_operator_table(capsys):
    assert main(["bench", "step", "--device", "cpu", "--profile", "embedded", "--methods", "dml+adm"]) == 0
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::convolution_backward" in out


def test_cli_bad_case_is_one_line_exit_2(capsys):
    assert main(["bench", "step", "--device", "cpu", "--cases", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cases has unknown names ['nope']" in err


def test_a_segmentation_case_runs_dml_adm_only(tmp_path):
    """The segmentation cases train on label maps with the dense ADM; offline methods are skipped."""
    config = bench_step.make_config(device="cpu", cases=["embedded_seg"], methods=["dml+adm", "kd+adm"],
                                    providers=["eager-fp32", "kdengine"], repeat=1, steps_per_window=1, warmup=1,
                                    batch=2, output=tmp_path / "step.csv")
    rows = bench_step.run(config)
    assert {(r["method"], r["provider"]) for r in rows} == {("dml+adm", "eager-fp32"), ("dml+adm", "kdengine")}
    assert all(r["img_size"] == 48 and r["batch"] == 2 and r["median_ms_per_step"] > 0 for r in rows)
