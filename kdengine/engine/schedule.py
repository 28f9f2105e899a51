"""Learning-rate schedules as per-step multipliers of each group's base rate (``LambdaLR``), so
a run resumed mid-epoch continues on exactly the same curve."""
from __future__ import annotations

import bisect
import math
from typing import Callable


def lr_lambda(optim_cfg, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """The factor for optimizer step ``step`` (0-based): linear warm-up over ``warmup_epochs``,
    then ``multistep`` (x gamma at each milestone epoch, paper CIFAR: 150/180/210), ``step`` (x
    gamma every ``step_size`` epochs, paper ImageNet: 30), ``cosine`` (to 0 at the last step) or
    ``constant``."""
    schedule = optim_cfg.schedule
    milestones = sorted(int(m) for m in optim_cfg.milestones)
    gamma, step_size = float(optim_cfg.gamma), int(optim_cfg.step_size)
    warmup_steps = float(optim_cfg.warmup_epochs) * steps_per_epoch
    total = max(1, epochs * steps_per_epoch)

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        if schedule == "multistep":
            value = gamma ** bisect.bisect_right(milestones, epoch)
        elif schedule == "step":
            value = gamma ** (epoch // step_size)
        elif schedule == "cosine":
            value = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        else:
            value = 1.0
        if warmup_steps > 0 and step < warmup_steps:
            value *= (step + 1) / warmup_steps
        return value

    return factor
