"""An exponential moving average of a model's weights (timm's ``ModelEmaV2``), updated on the
device after each optimizer step and evaluated beside the model it follows."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma:
    """``ema = decay * ema + (1 - decay) * model`` over every floating parameter and buffer
    (BatchNorm's running statistics too), after each optimizer step; integer buffers (BatchNorm's
    batch counter) are copied. The average starts from the model's weights at construction.

    The update is one ``torch._foreach_lerp_`` over tensors fixed at construction (the model's
    parameters are updated in place by the optimizer), so it has no host sync and can be part of
    a captured CUDA graph.

    Args:
        model: the model to follow (not a DDP wrapper: the module itself).
        decay: the decay, in (0, 1); e.g. 0.9998 (the PAT/OFA CIFAR recipes).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        source, target = model.state_dict(keep_vars=True), self.module.state_dict(keep_vars=True)
        pairs = [(target[k].detach(), source[k].detach()) for k in source]
        self._float = [(e, m) for e, m in pairs if e.is_floating_point()]
        self._other = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average toward the model's current weights."""
        if self._float:
            ema, model = zip(*self._float)
            # lerp(ema, model, 1 - decay) = decay * ema + (1 - decay) * model
            torch._foreach_lerp_(list(ema), list(model), 1.0 - self.decay)
        for ema, model in self._other:
            ema.copy_(model)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
