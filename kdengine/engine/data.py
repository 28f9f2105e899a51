"""The engine's data: the configured dataset's train and validation loaders."""
from __future__ import annotations

from pathlib import Path

import torch

from .distributed import DistContext


def _embedded_paths(cfg, dist: DistContext) -> tuple[Path, Path]:
    """The embedded dataset's .beton files, generated and written once (by rank 0) and cached."""
    from ..data import EmbeddedSpec, embedded_beton

    e = cfg.data.embedded
    spec = EmbeddedSpec(num_classes=e.num_classes, size=e.size, train_per_class=e.train_per_class,
                        val_per_class=e.val_per_class, seed=e.seed)
    if dist.is_main:
        paths = embedded_beton(spec, "train"), embedded_beton(spec, "val")
    dist.barrier()
    if not dist.is_main:
        paths = embedded_beton(spec, "train"), embedded_beton(spec, "val")
    return paths


def build_loaders(cfg, device: torch.device, dist: DistContext, *, dtype: torch.dtype, channels_last: bool):
    """``(train_loader, val_loader)`` yielding ``(images, labels, indices)`` and
    ``(images, labels)`` on ``device``."""
    from ..data.loaders import make_loader

    d = cfg.data
    if d.dataset == "embedded":
        train_path, val_path = _embedded_paths(cfg, dist)
    else:
        train_path, val_path = Path(d.train_path), Path(d.val_path)
        for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
            if not path.is_file():
                raise FileNotFoundError(f"{key}={path}: no such .beton file (write one with `kdengine data write`)")
    padding = d.crop_padding
    if padding is None:  # 4 px at 32 px as in the CIFAR recipes, scaled with the image size
        size = d.embedded.size if d.dataset == "embedded" else 32
        padding = max(1, size // 8)
    common = dict(device=device, dtype=dtype, channels_last=channels_last, num_workers=d.num_workers,
                  distributed=dist.enabled, seed=cfg.train.seed, os_cache=d.os_cache,
                  mean=list(d.mean) if d.mean is not None else None,
                  std=list(d.std) if d.std is not None else None,
                  device_resident=d.device_resident, resolution=d.resolution, crop_padding=padding)
    train = make_loader(train_path, pipeline=f"{d.pipeline}_train", batch_size=d.batch_size, order=d.order,
                        fields=("image", "label", "index"), **common)
    val = make_loader(val_path, pipeline=f"{d.pipeline}_val", batch_size=d.val_batch_size or 2 * d.batch_size,
                      order="sequential", fields=("image", "label"), **common)
    return train, val
