"""Distillation losses built on the fused ops."""
from .adm import ADMLoss, kd_delta
from .dml import DMLLoss, mutual_kl
from .kl import kd_kl, soft_probs

__all__ = ["ADMLoss", "DMLLoss", "kd_delta", "kd_kl", "mutual_kl", "soft_probs"]
