"""The benchmarks' settings are checked by the library and named as it spells them."""
import pytest
import torch

from kdengine.bench import ops as bench_ops
from kdengine.bench.data import DataBenchConfig
from kdengine.errors import SettingError


def test_ops_defaults_on_the_cpu():
    config = bench_ops.make_config(device="cpu")
    assert config.device == torch.device("cpu") and config.dtype == torch.float32
    assert config.cases == list(bench_ops.CASES) and config.ops == list(bench_ops.OPS)
    assert config.modes == list(bench_ops.MODES) and config.output is None
    assert config.providers == bench_ops.available_providers(torch.device("cpu"))
    assert config.providers[:2] == ["reference-eager", "reference-compile"]
    assert set(config.providers) <= set(bench_ops.PROVIDERS)


@pytest.mark.parametrize("settings, setting, words", [
    ({"cases": ["mnist"]}, "cases", "unknown names ['mnist']"),
    ({"ops": ["conv"]}, "ops", "unknown names ['conv']"),
    ({"modes": ["sideways"]}, "modes", "unknown names"),
    ({"providers": ["fortran"]}, "providers", "unknown names ['fortran']"),
    ({"providers": ["cuda"]}, "providers", "not available on cpu"),
    ({"dtype": "fp8"}, "dtype", "must be one of"),
    ({"repeat": 0}, "repeat", "at least 1"),
    ({"device": "not-a-device"}, "device", "not a torch device"),
    ({"device": "meta"}, "device", "CPU or CUDA"),
])
def test_ops_bad_settings(settings, setting, words):
    with pytest.raises(SettingError) as info:
        bench_ops.make_config(**{"device": "cpu", **settings})
    assert info.value.setting == setting and words in info.value.problem and "--" not in str(info.value)


@pytest.mark.parametrize("settings, setting", [
    ({"num_images": 4, "batch_size": 8}, "num_images"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"workers": -1}, "workers"),
    ({"write_mode": "png"}, "write_mode"),
])
def test_data_bad_settings(settings, setting):
    with pytest.raises(SettingError) as info:
        DataBenchConfig(**settings)
    assert info.value.setting == setting and "--" not in str(info.value)
