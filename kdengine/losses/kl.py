"""Temperature-scaled KL divergence, the distillation term of DML/KD (paper Eq. 2-3).

Logits are ``[B, C]`` (classification) or ``[B, C, *]`` (dense prediction: ``[B, C, h, w]``
segmentation logits), classes on dim 1; a dense KL is the per-position KL averaged over every
position of the batch (``B * h * w`` of them), which is what the segmentation methods use
(CIRKD's ``CriterionKD``: every pixel of the logits' grid, ignored-label pixels included, since
the KL needs no label).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(target || softmax(logits / tau))`` over dim 1, averaged over the rest.

    Args:
        logits: ``[B, C]`` or ``[B, C, *]`` (classes on dim 1).
        target_probs: probabilities of the same shape (already at temperature ``tau``); they
            receive no gradient.
        temperature: tau.

    Returns:
        The 0-d loss: for ``[B, C]`` the batch mean (``reduction="batchmean"``, as always); for
        ``[B, C, *]`` the mean over the ``B * prod(*)`` positions of the per-position KL.
    """
    log_p = F.log_softmax(logits / temperature, dim=1)
    if logits.dim() == 2:
        kl = F.kl_div(log_p, target_probs.detach(), reduction="batchmean")
    else:  # batchmean would divide by B only: divide the sum by every position instead
        kl = F.kl_div(log_p, target_probs.detach(), reduction="sum") / (logits.numel() // logits.shape[1])
    return kl * temperature**2


def soft_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / tau)`` over dim 1 (``[B, C]`` or ``[B, C, *]``), detached: a
    distillation target."""
    return F.softmax(logits.detach() / temperature, dim=1)
