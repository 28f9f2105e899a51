"""The engine's loaders: the embedded dataset with and without FFCV gives the same batches, and
training needs no FFCV."""
import sys

import pytest
import torch

from kdengine.data import DeviceLoader
from kdengine.engine import Trainer, load_config
from kdengine.engine.datasets import build_loaders, ffcv_available
from kdengine.engine.distributed import DistContext
from kdengine.engine.setup import Precision

CPU = torch.device("cpu")


def _loaders(overrides):
    cfg = load_config(overrides=overrides)
    return build_loaders(cfg, Precision.of(cfg.train, CPU), DistContext())


def _epochs(loader, epochs):
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.extend(loader)
    return out


@pytest.fixture
def no_ffcv(monkeypatch):
    """As on a machine without FFCV: ``import ffcv`` raises ImportError."""
    monkeypatch.setitem(sys.modules, "ffcv", None)
    assert not ffcv_available()


def test_embedded_data_needs_no_ffcv(tiny, tmp_path, no_ffcv):
    train, val = _loaders(tiny)
    assert isinstance(train, DeviceLoader) and isinstance(val, DeviceLoader)
    assert (train.dataset_size, val.dataset_size) == (4 * 24, 4 * 8)
    images, labels, indices = next(iter(train))
    assert images.shape == (16, 3, 16, 16) and labels.shape == indices.shape == (16,)
    assert sum(len(b[1]) for b in val) == 32
    assert not (tmp_path / "cache").exists()  # no .beton written


def test_without_ffcv_the_ffcv_loader_is_a_clear_error(tiny, no_ffcv):
    with pytest.raises(ModuleNotFoundError, match="data.device_resident=false .*FFCV"):
        _loaders(tiny + ["data.device_resident=false"])


def test_the_generator_arrays_give_the_batches_of_the_beton(tiny, monkeypatch):
    pytest.importorskip("ffcv")
    through_beton = [_epochs(loader, (0, 1)) for loader in _loaders(tiny)]
    monkeypatch.setitem(sys.modules, "ffcv", None)
    from_arrays = [_epochs(loader, (0, 1)) for loader in _loaders(tiny)]
    for a, b in zip(through_beton, from_arrays):
        assert len(a) == len(b) > 0
        for batch_a, batch_b in zip(a, b):
            for x, y in zip(batch_a, batch_b):
                assert torch.equal(x, y)


def test_training_without_ffcv_gives_the_numbers_of_training_with_it(tiny, monkeypatch):
    """A short run trains; where FFCV is installed, to the same weights as through the .beton."""
    overrides = tiny + ["train.max_steps=3"]
    runs = []
    if ffcv_available():
        runs.append(Trainer(load_config(overrides=overrides + ["train.run_name=ffcv"]), progress=False))
        runs[-1].fit()
    monkeypatch.setitem(sys.modules, "ffcv", None)
    runs.append(Trainer(load_config(overrides=overrides + ["train.run_name=arrays"]), progress=False))
    assert runs[-1].fit()["status"] == "max_steps"
    if len(runs) == 2:
        for a, b in zip(runs[0].models, runs[1].models):
            for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
                assert torch.equal(va, vb), key


def test_loading_leaves_the_runs_threads_alone(tiny):
    """FFCV sets torch's intra-op threads when imported and when a Loader is made; the run's own
    setting must survive building the loaders (else the FFCV path trains with other numbers)."""
    pytest.importorskip("ffcv")
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        _loaders(tiny)  # data.num_workers=1: FFCV would leave 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_imagenet_pipeline_options_reach_the_loaders(tiny):
    """data.val_crop_pct and data.train_interpolation (the PAT recipes' timm crop_pct and random
    bilinear/bicubic resize) configure the imagenet pipelines; other pipelines refuse them."""
    from kdengine.engine.config import ConfigError

    options = ["data.pipeline=imagenet", "data.resolution=16", "data.val_crop_pct=0.9",
               "data.train_interpolation=random"]
    train, val = _loaders([*tiny, *options])
    assert train.config.interpolation == "random" and val.config.val_crop_pct == 0.9
    plain_train, plain_val = _loaders([*tiny, "data.pipeline=imagenet", "data.resolution=16"])
    assert plain_train.config.interpolation == "bilinear" and plain_val.config.val_crop_pct is None
    for option in options[2:]:
        with pytest.raises(ConfigError, match="an option of data.pipeline=imagenet"):
            load_config(overrides=[*tiny, option])
