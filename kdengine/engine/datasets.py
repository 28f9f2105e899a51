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

import numpy as np
import torch

from ..data import DeviceLoader, EmbeddedSpec, embedded_beton, generate, make_loader
from ..data.segmentation import make_segmentation_loader
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
        ``(images, labels)`` on the device (labels ``[B]``, or label maps ``[B, H, W]`` for
        ``data.task=segmentation``).

    Raises:
        FileNotFoundError: a ``.beton`` path does not exist.
        ModuleNotFoundError: the configuration needs FFCV and it is not installed.
    """
    with _torch_threads_kept():
        return _build_loaders(cfg, precision, dist)


def _build_loaders(cfg, precision: Precision, dist: DistContext) -> tuple:
    d = cfg.data
    if d.task == "segmentation":
        return _segmentation_loaders(cfg, precision, dist)
    train_size = d.batch_size
    val_size = d.val_batch_size or 2 * d.batch_size
    train = dict(pipeline=f"{d.pipeline}_train", batch_size=train_size, order=d.order,
                 fields=("image", "label", "index"), **_augmentations(d))
    val = dict(pipeline=f"{d.pipeline}_val", batch_size=val_size, order="sequential", fields=("image", "label"))
    if d.pipeline == "imagenet":  # options of the RandomResizedCrop / centre-crop pipelines only
        train["interpolation"] = d.train_interpolation
        if d.val_crop_pct is not None:
            val["val_crop_pct"] = d.val_crop_pct
    common = _loader_options(cfg, precision, dist)
    if d.dataset == "embedded" and not ffcv_available():
        if d.device_resident is False:
            raise ModuleNotFoundError("data.device_resident=false reads the embedded dataset through FFCV, which is "
                                      "not installed (the [ffcv] extra); leave data.device_resident=auto",
                                      name="ffcv")
        spec = embedded_spec(cfg)
        loaders = []
        for split, options in (("train", train), ("val", val)):
            images, labels, _ = generate(spec, split)
            loaders.append(DeviceLoader.from_arrays(images, labels, **options, **common))
        return tuple(loaders)
    if d.dataset == "embedded":
        train_path, val_path = _embedded_paths(embedded_spec(cfg), dist)
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


def embedded_segmentation(spec: EmbeddedSpec, split: str) -> tuple:
    """The embedded dataset as a segmentation task.

    Args:
        spec: the embedded dataset's parameters.
        split: ``"train"`` or ``"val"``.

    Returns:
        ``(images uint8 [N, S, S, 3], label maps uint8 [N, S, S])``: each image's class + 1 on its
        object's pixels (the generator's foreground mask), 0 (background) elsewhere.
    """
    images, labels, masks = generate(spec, split)
    maps = masks.astype(np.uint8) * (labels.astype(np.uint8) + 1)[:, None, None]
    return images, maps


def _segmentation_loaders(cfg, precision: Precision, dist: DistContext) -> tuple:
    """``data.task=segmentation``: the embedded set's label maps, or a ``kdengine data write
    cityscapes`` .beton pair, through :func:`kdengine.data.segmentation.make_segmentation_loader`."""
    d = cfg.data
    if d.dataset == "embedded":
        spec = embedded_spec(cfg)
        sources = [embedded_segmentation(spec, split) for split in ("train", "val")]
    else:
        sources = [Path(d.train_path), Path(d.val_path)]
        for key, path in zip(("data.train_path", "data.val_path"), sources):
            if not path.is_file():
                raise FileNotFoundError(f"{key}={path}: no such .beton file (write one with "
                                        "`kdengine data write cityscapes`)")
    common = dict(device=precision.device, dtype=precision.input_dtype, channels_last=precision.channels_last,
                  ignore_index=d.ignore_index, seed=cfg.train.seed, distributed=dist.enabled,
                  num_workers=d.num_workers, device_resident=d.device_resident,
                  mean=list(d.mean) if d.mean is not None else None, std=list(d.std) if d.std is not None else None)
    # null: the stored size of the embedded set's square images (validation requires it for .beton data)
    crop = tuple(d.crop_size) if d.crop_size is not None else (d.embedded.size, d.embedded.size)
    train = make_segmentation_loader(sources[0], pipeline="seg_train", batch_size=d.batch_size, order=d.order,
                                     crop_size=crop, scale_range=tuple(d.scale_range), **common)
    val = make_segmentation_loader(sources[1], pipeline="seg_val", batch_size=d.val_batch_size or d.batch_size,
                                   **common)
    return train, val


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


def embedded_spec(cfg) -> EmbeddedSpec:
    """The embedded dataset's parameters of a run's configuration (``data.embedded``)."""
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
