"""Evaluation of M models and their ensemble, and of a saved checkpoint (`kdengine eval`)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from ..losses.segmentation import ALIGN_CORNERS, upsample_logits
from ..viz.calibration import ECE_BINS, calibration_bins, ece_from_bins
from . import checkpoint as ckpt
from .config import ExperimentConfig, apply_overrides, class_names_of, num_classes_of, validate
from .datasets import build_loaders
from .distributed import DistContext
from .metrics import confusion_matrix, segmentation_scores, topk_correct
from .setup import Precision, build_models, model_tags, resolve_device


@torch.no_grad()
def evaluate_models(models: Sequence[nn.Module], tags: Sequence[str], loader, device: torch.device,
                    autocast: Callable = nullcontext, dist: DistContext = DistContext()) -> dict[str, float]:
    """``{tag}/top1``, ``{tag}/top5`` (percent), ``{tag}/loss`` (mean cross-entropy) and ``{tag}/ece``
    (expected calibration error in percent, :mod:`kdengine.viz.calibration`) for every
    model and for ``ensemble``, the mean of the models' predicted probabilities; summed over all
    ranks. Leaves the models in eval mode."""
    for model in models:
        model.eval()
    names = list(tags) + ["ensemble"]
    sums = torch.zeros(len(names), 3, dtype=torch.float64, device=device)  # top1, top5, loss
    count = torch.zeros((), dtype=torch.float64, device=device)
    bins = torch.zeros(len(names), ECE_BINS, 3, dtype=torch.float64, device=device)  # calibration sums
    loader.set_epoch(0)
    for batch in loader:
        images, labels = batch[0], batch[1]
        with autocast():
            logits = [m(images).logits.float() for m in models]
        model_probs = [F.softmax(z, dim=1) for z in logits]
        probs = torch.stack(model_probs).mean(0)
        for i, p in enumerate(model_probs + [probs]):
            bins[i] += calibration_bins(p, labels)
        scores = logits + [probs]
        for i, z in enumerate(scores):
            t1, t5 = topk_correct(z, labels)
            sums[i, 0] += t1
            sums[i, 1] += t5
        for i, z in enumerate(logits):
            sums[i, 2] += F.cross_entropy(z, labels, reduction="sum")
        sums[-1, 2] += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        count += labels.shape[0]
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(count)
    dist.all_reduce_sum(bins)
    values = (sums / count.clamp_min(1)).tolist()
    result = {}
    for name, (top1, top5, loss), b in zip(names, values, bins):
        result.update({f"{name}/top1": 100 * top1, f"{name}/top5": 100 * top5, f"{name}/loss": loss,
                       f"{name}/ece": ece_from_bins(b)})
    return result


@torch.no_grad()
def evaluate_segmentation(models: Sequence[nn.Module], tags: Sequence[str], loader, device: torch.device,
                          num_classes: int, ignore_index: int = 255, autocast: Callable = nullcontext,
                          dist: DistContext = DistContext(), class_names: Optional[Sequence[str]] = None,
                          align_corners: bool = ALIGN_CORNERS) -> dict[str, float]:
    """Whole-image evaluation of segmentation models and their ensemble (the mean of their pixel
    probabilities): each model's logits upsampled to the label map's size
    (:func:`kdengine.losses.segmentation.upsample_logits`, as the training loss does), the argmax
    compared with the labels, confusion matrices summed over all ranks.

    Args:
        models: segmentation models (``forward`` returns a ``SegOutput``).
        tags: each model's name in the metrics.
        loader: yields ``(images, labels [B, H, W])``.
        device: where the sums live.
        num_classes: K.
        ignore_index: the label of pixels without a class.
        autocast: the run's autocast context.
        dist: the process group.
        class_names: K names for the per-class IoU keys (default ``0 .. K-1``).
        align_corners: of the bilinear upsampling (the method's ``seg.align_corners``).

    Returns:
        For every model and ``ensemble``: ``<tag>/miou``, ``<tag>/pixel_accuracy`` (percent),
        ``<tag>/loss`` (mean per-pixel cross-entropy over the labelled pixels) and
        ``<tag>/iou/<class>`` (percent; NaN for a class absent from the labels and predictions).
        Leaves the models in eval mode.
    """
    for model in models:
        model.eval()
    names = list(tags) + ["ensemble"]
    confusion = torch.zeros(len(names), num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(len(names), dtype=torch.float64, device=device)
    pixels = torch.zeros((), dtype=torch.float64, device=device)
    loader.set_epoch(0)
    for batch in loader:
        images, labels = batch[0], batch[1]
        with autocast():
            logits = [upsample_logits(m(images).logits.float(), labels.shape[-2:], align_corners) for m in models]
        probs = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(0)
        for i, z in enumerate(logits):
            loss_sum[i] += F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
        loss_sum[-1] += F.nll_loss(probs.clamp_min(1e-12).log(), labels, ignore_index=ignore_index, reduction="sum")
        pixels += (labels != ignore_index).sum()
        for i, z in enumerate(logits + [probs]):
            confusion[i] += confusion_matrix(z.argmax(1), labels, num_classes, ignore_index)
    dist.all_reduce_sum(confusion)
    dist.all_reduce_sum(loss_sum)
    dist.all_reduce_sum(pixels)
    class_names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    result = {}
    for name, conf, loss in zip(names, confusion, (loss_sum / pixels.clamp_min(1)).tolist()):
        scores = segmentation_scores(conf)
        result.update({f"{name}/miou": scores["miou"], f"{name}/pixel_accuracy": scores["pixel_accuracy"],
                       f"{name}/loss": loss})
        result.update({f"{name}/iou/{c}": v for c, v in zip(class_names, scores["iou"])})
    return result


def evaluate_run_models(cfg, models: Sequence[nn.Module], tags: Sequence[str], loader, device: torch.device,
                        autocast: Callable = nullcontext, dist: DistContext = DistContext()) -> dict[str, float]:
    """:func:`evaluate_models` or, for ``data.task=segmentation``, :func:`evaluate_segmentation`
    with the run's classes and ignore label."""
    if cfg.data.task == "segmentation":
        align = OmegaConf.select(cfg, "method.options.seg.align_corners", default=ALIGN_CORNERS)
        return evaluate_segmentation(models, tags, loader, device, num_classes_of(cfg), cfg.data.ignore_index,
                                     autocast, dist, class_names=class_names_of(cfg), align_corners=bool(align))
    return evaluate_models(models, tags, loader, device, autocast, dist)


def evaluate_checkpoint(path, overrides: Sequence[str] = ()) -> dict:
    """Rebuild the models and the validation loader of the run that saved ``path`` (its stored
    configuration, then ``overrides``), load the weights and evaluate them as the run did (its
    device rule, precision and layout).

    Args:
        path: a checkpoint written by :class:`~.trainer.Trainer`, or its run directory.
        overrides: ``key=value`` items applied to the stored configuration (e.g.
            ``data.val_path=...``).

    Returns:
        ``{"metrics", "tags", "names", "roles", "epoch", "step_in_epoch", "config", "path"}``:
        ``epoch`` counts the epochs completed, ``step_in_epoch`` the steps done in the next one
        (0 at an epoch's end), ``path`` is the checkpoint file.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: ``path`` is not a kdengine training checkpoint.
        ConfigError: the configuration, with ``overrides``, is not valid here (e.g. a CUDA
            ``train.device`` on a machine without one).
    """
    path = Path(path)
    if path.is_dir():
        if ckpt.find_last(path) is None:
            raise FileNotFoundError(f"{path} holds no {ckpt.LAST} (is it a kdengine run directory?)")
        path = path / ckpt.LAST
    state = ckpt.load(path)
    if "config" not in state or "models" not in state:
        raise ValueError(f"{path} is not a kdengine training checkpoint (no config/models in it)")
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(state["config"]))
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    device = resolve_device(cfg.train.device)
    precision = Precision.of(cfg.train, device)
    _, val_loader = build_loaders(cfg, precision, DistContext())
    models = build_models(cfg, precision, weights=[ckpt.model_state_dict(state, i) for i in range(len(cfg.models))])
    tags = model_tags(cfg)
    metrics = evaluate_run_models(cfg, models, tags, val_loader, device, precision.autocast)
    return {"metrics": metrics, "tags": tags, "names": [m.name for m in cfg.models],
            "roles": [m.role for m in cfg.models], "epoch": state["epoch"],
            "step_in_epoch": state.get("step_in_epoch", 0), "config": cfg, "path": path}
