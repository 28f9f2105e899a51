"""Distillation methods: the losses of M models' outputs for one batch (see ``base.Method``).

``build_method(name, models, roles=..., num_classes=..., num_samples=..., **options)`` is what the
engine calls; ``list_methods()`` names them all.
"""
from ._common import LOSS_KINDS, ADMPairs, ADMTerms
from .base import LossOutput, Method
from .builder import PRESETS, build_method, list_methods, method_options
from .offline import DKD, KD, FitNet, HintRegressor, dkd_parts
from .online import DML, KDCL, SwitOKD, Vanilla, kdcl_ensemble, mutual_kl, switokd_switch

__all__ = [
    "ADMPairs",
    "ADMTerms",
    "DKD",
    "DML",
    "FitNet",
    "HintRegressor",
    "KD",
    "KDCL",
    "LOSS_KINDS",
    "LossOutput",
    "Method",
    "PRESETS",
    "SwitOKD",
    "Vanilla",
    "build_method",
    "dkd_parts",
    "kdcl_ensemble",
    "list_methods",
    "method_options",
    "mutual_kl",
    "switokd_switch",
]
