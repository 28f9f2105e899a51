"""The model contract every zoo model follows, and the registry behind ``create_model``."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn


class ModelOutput(NamedTuple):
    """What a zoo model's ``forward`` returns.

    ``logits``: [B, num_classes]. ``features``: one map per stage, [B, C_i, H_i, W_i], each the
    stage's output *before* its final ReLU (what ADM consumes; the network itself continues from
    the ReLU of it). The last entry is the map ADM pools.

    ``hints``: the maps the public CIFAR-KD code (mdistiller / CRD) lists as ``feats``, one per
    entry of ``features`` (same length, same channels): what FitNet regresses. ``None`` when they
    are ``relu(features[i])`` entry for entry; a family whose ``feats`` differ (e.g. WRN's raw
    block outputs, MobileNetV2's linear bottlenecks) lists them. Positional unpacking therefore
    takes three names (``logits, features, hints = model(x)``); attribute access is the usual way.
    """

    logits: torch.Tensor
    features: list[torch.Tensor]
    hints: list[torch.Tensor] | None = None


class KDModel(nn.Module):
    """Base of the zoo models: ``forward(x) -> ModelOutput``.

    Subclasses set ``stage_channels`` (channels of each entry of ``features``) and
    ``num_classes``, and expose their classifier as ``head``: the module that maps the global
    average pool of the last stage's ReLU, [B, stage_channels[-1]], to the logits (ADM applies it
    to its attention-weighted pools).
    """

    stage_channels: tuple[int, ...]
    num_classes: int

    @property
    def head(self) -> nn.Module:  # pragma: no cover - every model overrides
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., KDModel]] = {}


def register_model(fn_or_name: Callable[..., KDModel] | str | None = None):
    """Add a model constructor to the registry behind ``create_model``.

    Used bare, ``@register_model`` registers the function under its own name, so the registry
    name of every model is a ``def`` that ``grep`` finds; ``@register_model("name")`` gives the
    name explicitly.

    Args:
        fn_or_name: the constructor (bare use), or the registry name (``None``: the function's
            ``__name__``). A constructor takes ``num_classes`` plus the model's keyword options.

    Returns:
        The constructor itself (bare use), else a decorator returning the constructor unchanged.

    Raises:
        ValueError: the name is registered already.
    """

    def add(name: str, fn: Callable[..., KDModel]) -> Callable[..., KDModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    if callable(fn_or_name):
        return add(fn_or_name.__name__, fn_or_name)
    return lambda fn: add(fn_or_name or fn.__name__, fn)


def list_models() -> list[str]:
    """The registered model names, sorted (what ``create_model`` accepts)."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs) -> KDModel:
    """Build a zoo model by name, e.g. ``create_model("resnet8x4", num_classes=100)``.

    Args:
        name: a registry name (``list_models()``).
        num_classes: width of the logits.
        **kwargs: the model's own options (e.g. ``width_mult``, ``zero_init_residual``).

    Returns:
        The model, freshly initialised.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    try:
        ctor = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return ctor(num_classes=num_classes, **kwargs)
