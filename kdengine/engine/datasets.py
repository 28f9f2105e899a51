"""The engine's data: the train and validation loaders of the configured dataset.

``data.dataset=beton`` reads the given ``.beton`` files with :func:`kdengine.data.make_loader`
(FFCV, or the device-resident loader). The embedded dataset, with FFCV installed, is written once
to cached ``.beton`` files and read the same way; without FFCV its generator's arrays feed the
device-resident loader directly. The ``.beton`` stores the generator's raw pixels, so both give
the same batches, and ``kdengine train`` runs where FFCV is not installed.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..data import DeviceLoader, EmbeddedSpec, embedded_beton, generate, make_loader
from .distributed import DistContext
from .setup import Precision


def ffcv_available() -> bool:
    """Whether FFCV can be imported (it is an optional dependency: the ``[ffcv]`` extra)."""
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _torch_threads_kept():
    """FFCV sets torch's intra-op threads as a side effect (to 1 when imported, to its worker
    count when a Loader is made); the run computes with its own (``train.threads`` or torch's
    default), whichever loader reads its data."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_loaders(cfg, precision: Precision, dist: DistContext) -> tuple:
    """The configured dataset's loaders; torch's intra-op threads are left as they were.

    Args:
        cfg: the experiment configuration (its ``data`` section and ``train.seed``).
        precision: the run's device, image dtype and layout.
        dist: the process group; each rank reads its shard.

    Returns:
        ``(train_loader, val_loader)``, yielding ``(images, labels, indices)`` and
        ``(images, labels)`` on the device.

    Raises:
        FileNotFoundError: a ``.beton`` path does not exist.
        ModuleNotFoundError: the configuration needs FFCV and it is not installed.
    """
    with _torch_threads_kept():
        return _build_loaders(cfg, precision, dist)


def _build_loaders(cfg, precision: Precision, dist: DistContext) -> tuple:
    d = cfg.data
    train_size = d.batch_size
    val_size = d.val_batch_size or 2 * d.batch_size
    train = dict(pipeline=f"{d.pipeline}_train", batch_size=train_size, order=d.order,
                 fields=("image", "label", "index"), **_augmentations(d))
    val = dict(pipeline=f"{d.pipeline}_val", batch_size=val_size, order="sequential", fields=("image", "label"))
    common = _loader_options(cfg, precision, dist)
    if d.dataset == "embedded" and not ffcv_available():
        if d.device_resident is False:
            raise ModuleNotFoundError("data.device_resident=false reads the embedded dataset through FFCV, which is "
                                      "not installed (the [ffcv] extra); leave data.device_resident=auto",
                                      name="ffcv")
        spec = _embedded_spec(cfg)
        loaders = []
        for split, options in (("train", train), ("val", val)):
            images, labels, _ = generate(spec, split)
            loaders.append(DeviceLoader.from_arrays(images, labels, **options, **common))
        return tuple(loaders)
    if d.dataset == "embedded":
        train_path, val_path = _embedded_paths(_embedded_spec(cfg), dist)
    else:
        train_path, val_path = Path(d.train_path), Path(d.val_path)
        for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
            if not path.is_file():
                raise FileNotFoundError(f"{key}={path}: no such .beton file (write one with `kdengine data write`)")
        if not ffcv_available():
            raise ModuleNotFoundError("data.dataset=beton reads .beton files with FFCV, which is not installed "
                                      "(the [ffcv] extra)", name="ffcv")
    return (make_loader(train_path, device_resident=d.device_resident, **train, **common),
            make_loader(val_path, device_resident=d.device_resident, **val, **common))


def _loader_options(cfg, precision: Precision, dist: DistContext) -> dict:
    """What the train and validation loaders share."""
    d = cfg.data
    padding = d.crop_padding
    if padding is None:  # 4 px at 32 px as in the CIFAR recipes, scaled with the image size
        size = d.embedded.size if d.dataset == "embedded" else 32
        padding = max(1, size // 8)
    return dict(device=precision.device, dtype=precision.input_dtype, channels_last=precision.channels_last,
                num_workers=d.num_workers, distributed=dist.enabled, seed=cfg.train.seed, os_cache=d.os_cache,
                mean=list(d.mean) if d.mean is not None else None, std=list(d.std) if d.std is not None else None,
                resolution=d.resolution, crop_padding=padding,
                **({"resize": d.resolution} if d.pipeline == "cifar" and d.resolution is not None else {}))


def _augmentations(data_cfg) -> dict:
    """The training loader's augmentations that are set (options of the device-resident loader)."""
    d = data_cfg
    return {key: value for key, value in (("randaugment", d.randaugment), ("random_erasing", d.random_erasing))
            if value}


def _embedded_spec(cfg) -> EmbeddedSpec:
    e = cfg.data.embedded
    return EmbeddedSpec(num_classes=e.num_classes, size=e.size, train_per_class=e.train_per_class,
                        val_per_class=e.val_per_class, seed=e.seed)


def _embedded_paths(spec: EmbeddedSpec, dist: DistContext) -> tuple[Path, Path]:
    """The embedded dataset's ``.beton`` files, generated and written once (by rank 0) and cached."""
    if dist.is_main:
        paths = embedded_beton(spec, "train"), embedded_beton(spec, "val")
    dist.barrier()
    if not dist.is_main:
        paths = embedded_beton(spec, "train"), embedded_beton(spec, "val")
    return paths
