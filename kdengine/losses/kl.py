"""Temperature-scaled KL divergence, the distillation term of DML/KD (paper Eq. 2-3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(target || softmax(logits / tau))``, averaged over the batch.

    ``target_probs`` are probabilities (already at temperature ``tau``); they receive no gradient.
    """
    log_p = F.log_softmax(logits / temperature, dim=1)
    return F.kl_div(log_p, target_probs.detach(), reduction="batchmean") * temperature**2


def soft_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / tau)``, detached: a distillation target."""
    return F.softmax(logits.detach() / temperature, dim=1)
