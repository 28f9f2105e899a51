"""Distillation losses built on the fused ops, and segmentation's task loss."""
from .adm import DENSE_FORMS, ADMLoss, DenseADMLoss, kd_delta, pixel_ce, region_ce, stage_feature_loss
from .dml import DMLLoss, mutual_kl
from .hcl import hcl, hcl_loss
from .kl import kd_kl, soft_probs
from .segmentation import SEG_DEFAULTS, SegSettings, labels_at, masked_ce, seg_cross_entropy, upsample_logits

__all__ = [
    "ADMLoss",
    "DENSE_FORMS",
    "DMLLoss",
    "DenseADMLoss",
    "SEG_DEFAULTS",
    "SegSettings",
    "hcl",
    "hcl_loss",
    "kd_delta",
    "kd_kl",
    "labels_at",
    "masked_ce",
    "mutual_kl",
    "pixel_ce",
    "region_ce",
    "seg_cross_entropy",
    "soft_probs",
    "stage_feature_loss",
    "upsample_logits",
]
