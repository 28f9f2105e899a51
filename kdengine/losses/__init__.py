"""Distillation losses built on the fused ops."""
from .adm import ADMLoss, kd_delta
from .dml import DMLLoss, mutual_kl
from .hcl import hcl, hcl_loss
from .kl import kd_kl, soft_probs

__all__ = ["ADMLoss", "DMLLoss", "hcl", "hcl_loss", "kd_delta", "kd_kl", "mutual_kl", "soft_probs"]
