"""Deep Mutual Learning loss (Zhang et al., 2018; ADM paper Eq. 2-4)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kl import kd_kl, soft_probs


def mutual_kl(
    logits: Sequence[torch.Tensor],
    temperature: float = 1.0,
    gates: Optional[Mapping[tuple[int, int], torch.Tensor]] = None,
) -> list[torch.Tensor]:
    """Each model's distillation term in mutual learning (ADM paper Eq. 2-3).

    For model m: ``tau^2 * KL(p_n || p_m)`` averaged over the other models n, each ``p_n``
    detached (the average for more than two models as in DML). Dense logits ``[B, C, h, w]``
    (segmentation) give the per-pixel KL averaged over every pixel of the grid (:func:`kd_kl`):
    DML's L_kd "both ways", each model towards the others, at every pixel.

    Args:
        logits: every model's logits, ``[B, C]`` or ``[B, C, *]`` each (one shape), two or more.
        temperature: tau.
        gates: optional 0-d multipliers ``{(m, n): g}`` of the term of model m towards model n,
            applied before averaging (SwitOKD's per-pair switch); missing pairs are not scaled.

    Returns:
        One 0-d tensor per model, in the order given.
    """
    probs = [soft_probs(z, temperature) for z in logits]
    out = []
    for m, z in enumerate(logits):
        kls = []
        for n, p in enumerate(probs):
            if n == m:
                continue
            kl = kd_kl(z, p, temperature)
            if gates is not None and (m, n) in gates:
                kl = gates[(m, n)] * kl
            kls.append(kl)
        out.append(sum(kls) / len(kls))
    return out


class DMLLoss(nn.Module):
    """``L_dml = sum_m [CE(z_m, y) + lambda * tau^2 * KL(p_other || p_m)]`` (Eq. 4).

    Each model learns from the others' detached predictions; with more than two models the KL
    term is averaged over the other models (:func:`mutual_kl`). Paper defaults: ``tau = 1``,
    ``lambda = 1``.

    Args:
        weight: lambda.
        temperature: tau.
    """

    def __init__(self, weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.weight = weight
        self.temperature = temperature

    def per_model(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        """The loss term of each model.

        Args:
            logits: every model's logits, ``[B, C]`` each (one shape), two or more.
            target: the labels, ``[B]``.

        Returns:
            ``CE(z_m, y) + lambda * mutual_kl_m`` per model, in the order given.

        Raises:
            ValueError: fewer than two models, logits of different shapes, or a target of
                another batch size.
        """
        if len(logits) < 2:
            raise ValueError(f"DMLLoss: logits needs two or more models' outputs, got {len(logits)}")
        shapes = {tuple(z.shape) for z in logits}
        if len(shapes) != 1:
            raise ValueError(f"DMLLoss: every model's logits must have one shape, got {sorted(shapes)}")
        if target.shape[0] != logits[0].shape[0]:
            raise ValueError(
                f"DMLLoss: target has {target.shape[0]} rows but logits have {logits[0].shape[0]}"
            )
        kls = mutual_kl(logits, self.temperature)
        return [F.cross_entropy(z, target) + self.weight * kl for z, kl in zip(logits, kls)]

    def forward(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The sum over models of ``per_model`` (same arguments); a 0-d tensor."""
        return torch.stack(self.per_model(logits, target)).sum()
