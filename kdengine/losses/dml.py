"""Deep Mutual Learning loss (Zhang et al., 2018; ADM paper Eq. 2-4)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kl import kd_kl, soft_probs


class DMLLoss(nn.Module):
    """``L_dml = sum_m [CE(z_m, y) + lambda * tau^2 * KL(p_other || p_m)]`` (Eq. 4).

    Each model learns from the others' detached predictions; with more than two models the KL
    term is averaged over the other models. Paper defaults: ``tau = 1``, ``lambda = 1``.
    """

    def __init__(self, weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.weight = weight
        self.temperature = temperature

    def per_model(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        """The loss term of each model, in the order given."""
        if len(logits) < 2:
            raise ValueError(f"DMLLoss: logits needs two or more models' outputs, got {len(logits)}")
        shapes = {tuple(z.shape) for z in logits}
        if len(shapes) != 1:
            raise ValueError(f"DMLLoss: every model's logits must have one shape, got {sorted(shapes)}")
        if target.shape[0] != logits[0].shape[0]:
            raise ValueError(
                f"DMLLoss: target has {target.shape[0]} rows but logits have {logits[0].shape[0]}"
            )
        probs = [soft_probs(z, self.temperature) for z in logits]
        terms = []
        for m, z in enumerate(logits):
            others = [p for n, p in enumerate(probs) if n != m]
            kl = sum(kd_kl(z, p, self.temperature) for p in others) / len(others)
            terms.append(F.cross_entropy(z, target) + self.weight * kl)
        return terms

    def forward(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.per_model(logits, target)).sum()
