"""Learning-rate schedules as per-step multipliers of each group's base rate (``LambdaLR``), so
a run resumed mid-epoch continues on exactly the same curve."""
from __future__ import annotations

import bisect
import math
from typing import Callable, Optional


def lr_lambda(optim_cfg, steps_per_epoch: int, epochs: int, base_lr: Optional[float] = None) -> Callable[[int], float]:
    """The factor of one parameter group's base rate at optimizer step ``step`` (0-based).

    The schedule: ``multistep`` (x gamma at each milestone epoch, paper CIFAR: 150/180/210),
    ``step`` (x gamma every ``step_size`` epochs, paper ImageNet: 30), ``cosine`` (from the base
    rate to ``min_lr`` at the last step, measured from step 0), ``poly`` (per step,
    ``(1 - step / total) ** power``, the segmentation recipes' decay with power 0.9) or
    ``constant``. Over the first
    ``warmup_epochs`` the rate rises linearly from ``warmup_lr`` to the schedule's value, one
    increment per step; the warm-up overlaps the schedule (timm's ``warmup_prefix=False``), and
    it ends on the schedule's value where timm's (per epoch) ends on the base rate and then
    steps down to it.

    ``per_epoch`` (``optim.per_epoch``) is timm's ``t_in_epochs`` scheduler, as the PAT/OFA
    recipes train: the rate changes once per epoch, at the epoch's start, ``cosine`` and ``poly``
    measured in epochs, and the warm-up is timm's: ``warmup_lr + e * (base - warmup_lr) /
    warmup_epochs`` for epochs ``e < warmup_epochs``, then the schedule's value.

    Args:
        optim_cfg: the ``optim`` settings (``schedule``, ``milestones``, ``gamma``,
            ``step_size``, ``warmup_epochs``, ``warmup_lr``, ``min_lr``, ``power``, ``per_epoch``).
        steps_per_epoch: optimizer steps per epoch.
        epochs: the run's epochs.
        base_lr: the group's base rate, which ``warmup_lr`` and ``min_lr`` (absolute rates)
            are relative to; default ``optim_cfg.lr``.

    Returns:
        ``factor(step) -> float``.
    """
    schedule = optim_cfg.schedule
    milestones = sorted(int(m) for m in optim_cfg.milestones)
    gamma, step_size = float(optim_cfg.gamma), int(optim_cfg.step_size)
    warmup_steps = float(optim_cfg.warmup_epochs) * steps_per_epoch
    total = max(1, epochs * steps_per_epoch)
    base = float(optim_cfg.lr if base_lr is None else base_lr)
    start, floor = float(optim_cfg.warmup_lr) / base, float(optim_cfg.min_lr) / base
    power = float(getattr(optim_cfg, "power", 0.9))
    per_epoch = bool(getattr(optim_cfg, "per_epoch", False))
    warmup_epochs = float(optim_cfg.warmup_epochs)

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        if per_epoch:  # timm's t_in_epochs: one value per epoch
            if warmup_epochs > 0 and epoch < warmup_epochs:
                return start + epoch * (1.0 - start) / warmup_epochs
            step = epoch * steps_per_epoch  # cosine / poly at the epoch's start
        if schedule == "multistep":
            value = gamma ** bisect.bisect_right(milestones, epoch)
        elif schedule == "step":
            value = gamma ** (epoch // step_size)
        elif schedule == "cosine":
            value = floor + (1.0 - floor) * (0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
        elif schedule == "poly":
            value = (1.0 - min(step, total) / total) ** power
        else:
            value = 1.0
        if not per_epoch and warmup_steps > 0 and step < warmup_steps:
            value = start + (value - start) * ((step + 1) / warmup_steps)
        return value

    return factor
