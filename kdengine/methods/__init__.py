"""Distillation methods: the losses of M models' outputs for one batch (see ``base.Method``).

``build_method(name, models, roles=..., num_classes=..., num_samples=..., **options)`` is what the
engine calls (``task="segmentation"`` for segmentation models: the online methods and their
``+adm``, whose ADM is dense); ``list_methods()`` names them all. Modules: ``base`` (the ``Method`` contract, roles),
``adm`` (the ``+adm`` component), ``online``, ``offline``, ``ofa`` and ``pat`` (heterogeneous
distillation), ``builder``.
"""
from ..losses.dml import mutual_kl
from .adm import ADMPairs
from .base import LOSS_KINDS, ROLES, TASKS, LossOutput, Method, students_of, teachers_of, topology
from .builder import PRESETS, SEG_PRESETS, build_method, list_methods, method_options
from .ofa import OFA, ofa_loss, stage_features
from .offline import DKD, KD, FitNet, HintRegressor, OfflineMethod, dkd_parts, hint_map
from .online import DML, KDCL, SwitOKD, Vanilla, kdcl_ensemble, switokd_switch
from .pat import PAT, PromptBlock, RegionAwareAttention

__all__ = [
    "ADMPairs",
    "DKD",
    "DML",
    "FitNet",
    "HintRegressor",
    "KD",
    "KDCL",
    "LOSS_KINDS",
    "LossOutput",
    "Method",
    "OFA",
    "OfflineMethod",
    "PAT",
    "PRESETS",
    "PromptBlock",
    "ROLES",
    "RegionAwareAttention",
    "SEG_PRESETS",
    "SwitOKD",
    "TASKS",
    "Vanilla",
    "build_method",
    "dkd_parts",
    "hint_map",
    "kdcl_ensemble",
    "list_methods",
    "method_options",
    "mutual_kl",
    "ofa_loss",
    "stage_features",
    "students_of",
    "switokd_switch",
    "teachers_of",
    "topology",
]
