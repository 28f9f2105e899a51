"""``build_method``: the one entry point the engine uses to turn a method name into a Method."""
from __future__ import annotations

import copy
import numbers
from typing import Any, Optional, Sequence

import torch.nn as nn

from ..losses.adm import DENSE_FORMS
from ..losses.segmentation import SEG_DEFAULTS
from .adm import ADMPairs
from .base import TASKS, Method, students_of, teachers_of
from .ofa import OFA
from .offline import DKD, KD, FitNet
from .online import DML, KDCL, KDCL_ENSEMBLES, SwitOKD, Vanilla
from .pat import PAT

PRESETS = ("cifar", "imagenet")
#: The presets of ``task="segmentation"`` (its default: the first).
SEG_PRESETS = ("segmentation",)

# Hyper-parameter defaults per preset. Sources: ADM paper (ICML 2025) Sec. 5.1 (online ADM,
# tau = lambda = 1 for every online method), Sec. 5.5 (offline ADM), Sec. 5.7 / Eq. 12 (delta);
# mdistiller's configs for KD, DKD and FitNet (the ADM paper gives none for them); PAT's and OFA-KD's
# public train.py for pat and ofa (the same on both datasets but OFA's eps: its README's 1.0 on
# CIFAR-100, 1.5 on ImageNet).
_ADM_COMMON = {
    "co": "ce", "di": "ce", "temperature": 1.0, "eps": 1e-5, "impl": None,
    "delta_start": 0.2, "delta_end": 0.6, "buffer_dtype": "float32",
}
_PAT = {
    "ce_weight": 1.0, "kd_weight": 1.0, "mse_weight": 1.0, "reg_weight": 1.0, "temperature": 1.0,
    "label_smoothing": 0.1, "num_queries": 64, "dim": 512, "heads": 8, "img_size": None, "compat": None, "impl": None,
}
_OFA = {
    "ce_weight": 1.0, "kd_weight": 1.0, "ofa_weight": 1.0, "temperature": 1.0, "label_smoothing": 0.1,
    "stages": [1, 2, 3, 4], "img_size": None,
}
_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "cifar": {
        "adm_online": {"alpha": 0.01, "beta": 0.01, "gamma": 1.0, **_ADM_COMMON},
        "adm_offline": {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, **_ADM_COMMON},
        "vanilla": {},
        "dml": {"weight": 1.0, "temperature": 1.0},
        "kdcl": {"weight": 1.0, "temperature": 1.0, "ensemble": "minlogit"},
        "switokd": {"weight": 1.0, "temperature": 1.0},
        "kd": {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0},
        "dkd": {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20},
        "fitnet": {"ce_weight": 1.0, "feat_weight": 100.0, "hint_layer": None, "impl": None},
        "pat": dict(_PAT),
        "ofa": {**_OFA, "eps": 1.0},
    },
    "imagenet": {
        "adm_online": {"alpha": 0.2, "beta": 0.6, "gamma": 0.01, **_ADM_COMMON},
        "adm_offline": {"alpha": 0.1, "beta": 0.0, "gamma": 0.0, **_ADM_COMMON},
        "vanilla": {},
        "dml": {"weight": 1.0, "temperature": 1.0},
        "kdcl": {"weight": 1.0, "temperature": 1.0, "ensemble": "minlogit"},
        "switokd": {"weight": 1.0, "temperature": 1.0},
        "kd": {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 1.0},
        "dkd": {"ce_weight": 1.0, "alpha": 1.0, "beta": 0.5, "temperature": 1.0, "warmup": 1},
        "fitnet": {"ce_weight": 1.0, "feat_weight": 100.0, "hint_layer": None, "impl": None},
        "pat": dict(_PAT),
        "ofa": {**_OFA, "eps": 1.5},
    },
}

# Segmentation (ADM paper Sec. 5.3 / Table 5, which gives no ADM weights for it). The online
# methods keep tau = lambda = 1 (the paper's Sec. 5.1, and its "L_dml: per-pixel KL at T = 1").
# ADM's weights reuse the ImageNet ones (alpha 0.2, beta 0.6, gamma 0.01) rather than CIFAR's
# (0.01, 0.01, 1.0): the segmentation backbones are ImageNet-pretrained ResNet-18/101 on large
# images, as in the ImageNet setting; dense L_co / L_di are cross-entropies of the same
# magnitude as the task's (region form: one pooled CE per class present; pixel form: a reweighted
# per-pixel CE), for which CIFAR's 0.01 would be negligible; and L_feat, an MSE of stage features
# summed over four stages with ResNet-101's 1024/2048-channel maps, would dwarf the task loss at
# CIFAR's gamma = 1. The region form is the default (the faithful generalisation of Algorithm 1).
# No delta / buffer options: the "kd" variants are not defined for segmentation.
_SEG_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "segmentation": {
        "adm_online": {"alpha": 0.2, "beta": 0.6, "gamma": 0.01, "dense": "region", "co": "ce", "di": "ce",
                       "eps": 1e-5, "impl": None},
        "vanilla": {},
        "dml": {"weight": 1.0, "temperature": 1.0},
        "kdcl": {"weight": 1.0, "temperature": 1.0, "ensemble": "minlogit"},
        "switokd": {"weight": 1.0, "temperature": 1.0},
        "seg": dict(SEG_DEFAULTS),
    },
}

_ONLINE = {"vanilla": Vanilla, "dml": DML, "kdcl": KDCL, "switokd": SwitOKD}
_OFFLINE = {"kd": KD, "dkd": DKD, "fitnet": FitNet}
_BASES = {**_ONLINE, **_OFFLINE}  # the methods with a ``+adm`` variant
_HETERO = {"pat": PAT, "ofa": OFA}  # heterogeneous distillation (no ``+adm``: ADM is defined on CNN maps)
_CLASSES = {**_BASES, **_HETERO}
# options given at the top level that belong to the base method's dict (when it has that key)
_HOISTED = ("temperature", "compat")
_TOP_LEVEL = ("preset", *_HOISTED, "adm")


def list_methods() -> list[str]:
    """Every name ``build_method`` accepts: each base method, its ``+adm`` variant where it has
    one, ``pat`` and ``ofa``."""
    return sorted([*_CLASSES, *(f"{b}+adm" for b in _BASES)])


def _split(name: str) -> tuple[str, bool]:
    if not isinstance(name, str) or name.strip().lower() not in list_methods():
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    base, _, adm = name.strip().lower().partition("+")
    return base, bool(adm)


def _merge(what: str, defaults: dict, given: Optional[dict]) -> dict:
    out = dict(defaults)
    if given is None:
        return out
    if not isinstance(given, dict):
        raise TypeError(f"option {what!r} must be a dict, got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {what} option(s) {unknown}; valid: {', '.join(sorted(defaults)) or '(none)'}"
        )
    out.update(given)
    return out


def _seg_methods() -> list[str]:
    return sorted([*_ONLINE, *(f"{b}+adm" for b in _ONLINE)])


def _check_task(name: str, base: str, task) -> None:
    if task not in TASKS:
        raise ValueError(f"{name}: task must be one of {TASKS}, got {task!r}")
    if task == "segmentation" and base not in _ONLINE:
        raise ValueError(
            f"method {name!r} does not support task='segmentation'; supported: {', '.join(_seg_methods())}"
        )


def _check_seg(options: dict) -> None:
    """Refuse segmentation options of the wrong type or range (one line each)."""
    w = options["aux_weight"]
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or w < 0:
        raise ValueError(f"seg aux_weight must be a number >= 0, got {w!r}")
    if isinstance(options["ignore_index"], bool) or not isinstance(options["ignore_index"], numbers.Integral):
        raise ValueError(f"seg ignore_index must be an int, got {options['ignore_index']!r}")
    if not isinstance(options["align_corners"], bool):
        raise ValueError(f"seg align_corners must be true or false, got {options['align_corners']!r}")


def method_options(name: str, *, task: str = "classification", **options) -> dict:
    """The hyper-parameters ``build_method(name, ..., task=task, **options)`` would use, defaults
    filled in: ``{"preset": ..., "<base>": {...}, "adm": {...}}`` (``"adm"`` only for ``+adm``
    names; segmentation adds ``"seg": {...}``)."""
    base, with_adm = _split(name)
    _check_task(name, base, task)
    seg = task == "segmentation"
    options = {k: v for k, v in options.items() if v is not None}  # None: "use the default"
    if not seg and "seg" in options:
        raise ValueError(f"option 'seg' applies to task='segmentation' only (method {name!r}, task={task!r})")
    if not seg and with_adm and isinstance(options.get("adm"), dict) and "dense" in options["adm"]:
        raise ValueError(f"adm option 'dense' applies to task='segmentation' only (method {name!r}, task={task!r})")
    valid = ["preset", base] + (["adm"] if with_adm else []) + (["seg"] if seg else [])
    valid += [key for key in _HOISTED if key in _DEFAULTS["cifar"][base]]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hint = ""
        other = [k for k in unknown if k in _CLASSES or k in _TOP_LEVEL]
        if other:
            hint = f" ({', '.join(other)} does not apply to method {name!r})"
        raise ValueError(
            f"unknown option(s) {unknown} for method {name!r}{hint}; valid: {', '.join(sorted(valid))}"
        )
    presets = SEG_PRESETS if seg else PRESETS
    preset = options.get("preset", presets[0])
    if preset not in presets:
        if seg:
            raise ValueError(f"preset must be one of {SEG_PRESETS} for task='segmentation', got {preset!r}")
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    defaults = copy.deepcopy(_SEG_DEFAULTS[preset] if seg else _DEFAULTS[preset])
    resolved = {"preset": preset, base: _merge(base, defaults[base], options.get(base))}
    for key in _HOISTED:
        if key in options:
            if isinstance(options.get(base), dict) and key in options[base]:
                raise ValueError(f"{key} is given twice: {key}= and {base}={{'{key}': ...}}")
            resolved[base][key] = options[key]
    if with_adm:
        kind = "adm_offline" if base in _OFFLINE else "adm_online"
        resolved["adm"] = _merge("adm", defaults[kind], options.get("adm"))
        if base in _OFFLINE and float(resolved["adm"]["beta"]) != 0.0:
            raise ValueError(
                f"{name}: adm beta must be 0 for offline distillation (the frozen teacher cannot learn "
                f"from L_di; ADM paper Sec. 5.5), got {resolved['adm']['beta']}"
            )
        if seg:
            adm = resolved["adm"]
            if adm["dense"] not in DENSE_FORMS:
                raise ValueError(f"adm dense must be one of {DENSE_FORMS}, got {adm['dense']!r}")
            if adm["co"] != "ce" or adm["di"] != "ce":
                raise ValueError(
                    f"{name}: adm co and di must be 'ce' for task='segmentation' (Eq. 7-8; the 'kd' variants "
                    f"would need per-pixel previous-epoch teacher maps), got co={adm['co']!r}, di={adm['di']!r}"
                )
    if seg:
        resolved["seg"] = _merge("seg", defaults["seg"], options.get("seg"))
        _check_seg(resolved["seg"])
    if base == "kdcl" and resolved[base]["ensemble"] not in KDCL_ENSEMBLES:
        raise ValueError(f"kdcl ensemble must be one of {KDCL_ENSEMBLES}, got {resolved[base]['ensemble']!r}")
    return resolved


def _check_roles(name: str, cls: type[Method], with_adm: bool, models, roles) -> tuple[str, ...]:
    """The roles, normalised: the method's own rule (``cls.check_roles``), one per model, and
    ADM's need for a teacher and a student. Checked before anything is built."""
    roles = cls.check_roles(roles, name)
    if len(roles) != len(models):
        raise ValueError(f"{name}: {len(models)} models but {len(roles)} roles {roles}")
    if with_adm and (not teachers_of(roles) or not students_of(roles)):
        raise ValueError(f"{name}: needs at least one teacher and one student, got roles {roles}")
    return roles


def build_method(
    name: str,
    models: Sequence[nn.Module],
    *,
    roles: Sequence[str],
    num_classes: int,
    num_samples: Optional[int] = None,
    task: str = "classification",
    **options,
) -> Method:
    """Build the distillation method ``name`` for ``models`` (aligned with ``roles``).

    Names (``list_methods()``): online ``vanilla``, ``dml``, ``kdcl``, ``switokd``; offline
    ``kd``, ``dkd``, ``fitnet`` (exactly one teacher, frozen: ``trainable`` False); each with a
    ``+adm`` variant adding ADM between every teacher and every student (three models: 1T2S,
    2T1S as in the ADM paper's Table 11); heterogeneous ``pat`` (one frozen teacher, one student)
    and ``ofa`` (one frozen teacher).

    Options (a missing or ``None`` option takes the preset's default; see ``method_options``):
        preset: ``"cifar"`` (default) or ``"imagenet"``: which paper setting the defaults follow.
        temperature: the base method's distillation temperature (not for vanilla, fitnet).
        compat: (pat) ``"authors"`` for the public code's behaviour (see ``PAT``).
        <base>: a dict of the base method's hyper-parameters, e.g. ``dkd={"beta": 6.0}``:
            dml / switokd ``weight, temperature``; kdcl ``weight, temperature, ensemble``;
            kd ``ce_weight, kd_weight, temperature``; dkd ``ce_weight, alpha, beta, temperature,
            warmup``; fitnet ``ce_weight, feat_weight, hint_layer, impl``; pat ``ce_weight,
            kd_weight, mse_weight, reg_weight, temperature, label_smoothing, num_queries, dim,
            heads, img_size, compat, impl``; ofa ``ce_weight, kd_weight, ofa_weight, eps,
            temperature, label_smoothing, stages, img_size``.
        adm: (``+adm`` only) ``alpha, beta, gamma, co, di, temperature, eps, impl, delta_start,
            delta_end, buffer_dtype``.
    ``num_samples`` (the training-set size) is needed by ADM's ``di="kd"`` buffer only.

    ``task="segmentation"``: the models are segmentation models (``SegOutput``, ``head``,
    ``head_channels``, ``stage_channels``); the methods ``vanilla``, ``dml``, ``kdcl``, ``switokd``
    and their ``+adm``; the preset ``"segmentation"`` (the only one, the default; its ADM weights
    are the ImageNet ones, see ``_SEG_DEFAULTS``); and two more options:
        seg: ``aux_weight`` (0.4), ``ignore_index`` (255), ``align_corners`` (True, CIRKD's; see
            :mod:`kdengine.losses.segmentation`).
        adm: also ``dense``: ``"region"`` (default) or ``"pixel"`` (:class:`~kdengine.losses.DenseADMLoss`);
            ``co`` / ``di`` only ``"ce"``; no ``temperature``, ``delta_*``, ``buffer_dtype``.

    Raises:
        ValueError: an unknown method, task, option or role set; a method without segmentation
            for ``task="segmentation"``; ``seg`` or ``adm.dense`` for classification.
    """
    base, with_adm = _split(name)
    _check_task(name, base, task)
    models = list(models)
    roles = _check_roles(name, _CLASSES[base], with_adm, models, roles)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes <= 0:
        raise ValueError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
    num_classes = int(num_classes)
    resolved = method_options(name, task=task, **options)
    adm = None
    if with_adm:
        pairs = [(t, s) for t in teachers_of(roles) for s in students_of(roles)]
        seg = {"task": task, "ignore_index": resolved["seg"]["ignore_index"]} if task == "segmentation" else {}
        adm = ADMPairs(models, pairs, num_samples=num_samples, num_classes=num_classes, **resolved["adm"], **seg)
    kwargs = dict(resolved[base])
    if task == "segmentation":
        method = _ONLINE[base](roles, num_classes, adm=adm, task=task, seg=resolved["seg"], **kwargs)
    elif base == "fitnet":
        method = FitNet(roles, num_classes, models, adm=adm, **kwargs)
    elif base in _HETERO:
        method = _HETERO[base](roles, num_classes, models, **kwargs)
    else:
        method = _BASES[base](roles, num_classes, adm=adm, **kwargs)
    method.name = f"{base}+adm" if with_adm else base
    method.options = resolved
    return method
