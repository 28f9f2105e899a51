"""``build_method``: the one entry point the engine uses to turn a method name into a Method."""
from __future__ import annotations

import copy
import numbers
from typing import Any, Optional, Sequence

import torch.nn as nn

from .adm import ADMPairs
from .base import Method, students_of, teachers_of
from .ofa import OFA
from .offline import DKD, KD, FitNet
from .online import DML, KDCL, KDCL_ENSEMBLES, SwitOKD, Vanilla
from .pat import PAT

PRESETS = ("cifar", "imagenet")

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


def method_options(name: str, **options) -> dict:
    """The hyper-parameters ``build_method(name, ..., **options)`` would use, defaults filled in:
    ``{"preset": ..., "<base>": {...}, "adm": {...}}`` (``"adm"`` only for ``+adm`` names)."""
    base, with_adm = _split(name)
    options = {k: v for k, v in options.items() if v is not None}  # None: "use the default"
    valid = ["preset", base] + (["adm"] if with_adm else [])
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
    preset = options.get("preset", "cifar")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    defaults = copy.deepcopy(_DEFAULTS[preset])
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
    """
    base, with_adm = _split(name)
    models = list(models)
    roles = _check_roles(name, _CLASSES[base], with_adm, models, roles)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes <= 0:
        raise ValueError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
    num_classes = int(num_classes)
    resolved = method_options(name, **options)
    adm = None
    if with_adm:
        pairs = [(t, s) for t in teachers_of(roles) for s in students_of(roles)]
        adm = ADMPairs(models, pairs, num_samples=num_samples, num_classes=num_classes, **resolved["adm"])
    kwargs = dict(resolved[base])
    if base == "fitnet":
        method = FitNet(roles, num_classes, models, adm=adm, **kwargs)
    elif base in _HETERO:
        method = _HETERO[base](roles, num_classes, models, **kwargs)
    else:
        method = _BASES[base](roles, num_classes, adm=adm, **kwargs)
    method.name = f"{base}+adm" if with_adm else base
    method.options = resolved
    return method
