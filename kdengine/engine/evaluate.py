"""Evaluation of M models and their ensemble, and of a saved checkpoint (`kdengine eval`)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from ..viz.calibration import ECE_BINS, calibration_bins, ece_from_bins
from . import checkpoint as ckpt
from .config import ExperimentConfig, apply_overrides, validate
from .datasets import build_loaders
from .distributed import DistContext
from .metrics import topk_correct
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
    metrics = evaluate_models(models, tags, val_loader, device, precision.autocast)
    return {"metrics": metrics, "tags": tags, "names": [m.name for m in cfg.models],
            "roles": [m.role for m in cfg.models], "epoch": state["epoch"],
            "step_in_epoch": state.get("step_in_epoch", 0), "config": cfg, "path": path}
