"""Reading a run directory for analysis: its records, its checkpoints (the last one and those kept
per epoch), the models and ADM connectors of a checkpoint, and its validation images with their
foreground masks where the data has them.

A run directory (written by :class:`kdengine.engine.Trainer`) holds ``config.yaml``,
``metrics.jsonl``, ``checkpoint.pt`` and, with ``train.keep_checkpoints``, one
``checkpoint-epoch<NNN>.pt`` per finished epoch (NNN: epochs done, from 001;
:func:`kdengine.engine.checkpoint.epoch_checkpoints` lists them).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from ..data import DeviceLoader, EmbeddedSpec, beton_info, generate, make_loader
from ..data.segmentation import make_segmentation_loader
from ..engine import checkpoint as ckpt
from ..engine.config import ExperimentConfig, num_classes_of, validate
from ..engine.datasets import embedded_segmentation, embedded_spec
from ..engine.setup import Precision, build_models, model_tags, resolve_device, run_method_options
from ..methods import build_method


def read_records(run_dir: os.PathLike | str) -> list[dict]:
    """The run's ``metrics.jsonl`` records (one per epoch and split).

    Raises:
        FileNotFoundError: the directory has no ``metrics.jsonl``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a kdengine run directory?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_config(run_dir: os.PathLike | str) -> Optional[DictConfig]:
    """The resolved configuration in the run's ``config.yaml`` (on the current defaults), or None."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    return OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(path))


@dataclass
class LoadedCheckpoint:
    """A checkpoint's models (eval mode) and ADM pairs, set up as its run evaluated them."""

    path: Path
    cfg: DictConfig
    precision: Precision
    models: nn.ModuleList
    tags: list[str]
    names: list[str]
    roles: list[str]
    epoch: int  # epochs done when it was saved
    adm: Optional[nn.Module]  # the method's ADMPairs (its connectors), None without ADM
    kdengine_version: str


def _num_samples(method_state: dict) -> Optional[int]:
    """The training-set size ADM's ``di="kd"`` buffer was built for ([2 * N, C] rows), if any."""
    for key, value in method_state.items():
        if ".prev_probs_" in key or key.startswith("prev_probs_"):
            return value.shape[0] // 2
    return None


def load_checkpoint(path: os.PathLike | str, device: str = "auto") -> LoadedCheckpoint:
    """Rebuild a training checkpoint's models and method for analysis.

    Args:
        path: a checkpoint written by the trainer.
        device: ``train.device`` for the analysis (``auto``: CUDA when available); the precision
            follows the engine's rule for that device.

    Returns:
        The :class:`LoadedCheckpoint`.

    Raises:
        ValueError: ``path`` is not a kdengine training checkpoint.
    """
    state = ckpt.load(path)
    if "config" not in state or "models" not in state:
        raise ValueError(f"{path} is not a kdengine training checkpoint (no config/models in it)")
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(state["config"]))
    cfg.train.device = device
    validate(cfg)
    precision = Precision.of(cfg.train, resolve_device(device))
    models = build_models(cfg, precision, weights=[ckpt.model_state_dict(state, i) for i in range(len(cfg.models))])
    models.eval()
    roles = [m.role for m in cfg.models]
    adm = None
    if "method" in state:
        method = build_method(cfg.method.name, list(models), roles=roles, num_classes=num_classes_of(cfg),
                              num_samples=_num_samples(state["method"]), task=cfg.data.task,
                              **run_method_options(cfg))
        method.load_state_dict(state["method"])
        adm = method.adm.to(precision.device).eval() if method.adm is not None else None
    return LoadedCheckpoint(Path(path), cfg, precision, models, model_tags(cfg), [m.name for m in cfg.models], roles,
                            int(state.get("epoch", 0)), adm, str(state.get("kdengine_version", "")))


# ----------------------------------------------------------------------------------- validation data


@dataclass
class ValidationData:
    """The first validation samples of a run's data, through its validation pipeline."""

    loader: object  # a KDLoader yielding (image, label[, mask])
    has_masks: bool
    limit: Optional[int]
    mean: tuple
    std: tuple

    def batches(self) -> Iterator[tuple]:
        """``(images, labels, masks or None)`` batches, at most ``limit`` samples in all."""
        seen = 0
        self.loader.set_epoch(0)
        for batch in self.loader:
            images, labels = batch[0], batch[1]
            masks = batch[2] if self.has_masks else None
            if self.limit is not None and seen + labels.shape[0] > self.limit:
                keep = self.limit - seen
                images, labels = images[:keep], labels[:keep]
                masks = masks[:keep] if masks is not None else None
            if labels.shape[0] == 0:
                break
            seen += labels.shape[0]
            yield images, labels, masks
            if self.limit is not None and seen >= self.limit:
                break

    def pixels(self, images: torch.Tensor) -> np.ndarray:
        """Normalised images ``[B, 3, H, W]`` back to displayable uint8 ``[B, H, W, 3]``."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        x = images.float() * std + mean
        return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def validation_data(cfg: DictConfig, precision: Precision, limit: Optional[int] = None,
                    batch_size: int = 256) -> ValidationData:
    """The run's validation samples with foreground masks where the data has them.

    The embedded dataset is generated (its masks come with it) and fed through the run's
    validation pipeline; a ``.beton`` is read with its ``mask`` field when it has one.

    Args:
        cfg: the run's configuration.
        precision: the analysis's device, dtype and layout.
        limit: at most this many samples (the first ones, in the file's order); None: all.
        batch_size: samples per batch.

    Returns:
        The :class:`ValidationData`.
    """
    d = cfg.data
    if d.task == "segmentation":
        return _segmentation_validation_data(cfg, precision, limit, batch_size)
    options = dict(pipeline=f"{d.pipeline}_val", batch_size=batch_size, order="sequential", device=precision.device,
                   dtype=precision.input_dtype, channels_last=precision.channels_last, resolution=d.resolution,
                   mean=list(d.mean) if d.mean is not None else None,
                   std=list(d.std) if d.std is not None else None)
    if d.dataset == "embedded":
        e = d.embedded
        spec = EmbeddedSpec(num_classes=e.num_classes, size=e.size, train_per_class=e.train_per_class,
                            val_per_class=e.val_per_class, seed=e.seed)
        images, labels, masks = generate(spec, "val")
        if limit is not None:
            images, labels, masks = images[:limit], labels[:limit], masks[:limit]
        loader = DeviceLoader.from_arrays(images, labels, masks, fields=("image", "label", "mask"), **options)
        has_masks = True
    else:
        has_masks = "mask" in beton_info(d.val_path).fields
        fields = ("image", "label", "mask") if has_masks else ("image", "label")
        loader = make_loader(d.val_path, fields=fields, num_workers=d.num_workers, os_cache=d.os_cache,
                             device_resident=d.device_resident, **options)
    return ValidationData(loader, has_masks, limit, tuple(loader.config.mean), tuple(loader.config.std))


def _segmentation_validation_data(cfg: DictConfig, precision: Precision, limit: Optional[int],
                                  batch_size: int) -> ValidationData:
    """A segmentation run's validation images with their label maps (as the labels; no masks):
    the embedded set's (the first ``limit``), or the run's validation .beton."""
    d = cfg.data
    options = dict(pipeline="seg_val", batch_size=batch_size, device=precision.device, dtype=precision.input_dtype,
                   channels_last=precision.channels_last, ignore_index=d.ignore_index,
                   mean=list(d.mean) if d.mean is not None else None,
                   std=list(d.std) if d.std is not None else None)
    if d.dataset == "embedded":
        images, maps = embedded_segmentation(embedded_spec(cfg), "val")
        if limit is not None:
            images, maps = images[:limit], maps[:limit]
        loader = make_segmentation_loader((images, maps), **options)
    else:
        loader = make_segmentation_loader(d.val_path, num_workers=d.num_workers, device_resident=d.device_resident,
                                          **options)
    return ValidationData(loader, False, limit, tuple(loader.config.mean), tuple(loader.config.std))
