"""The model contract every zoo model follows, and the registry behind ``create_model``."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn


class ModelOutput(NamedTuple):
    """What a zoo model's ``forward`` returns.

    ``logits``: [B, num_classes]. ``features``: one map per stage, [B, C_i, H_i, W_i], each the
    stage's output *before* its final ReLU (what ADM and FitNet consume; the network itself
    continues from the ReLU of it). The last entry is the map ADM pools.
    """

    logits: torch.Tensor
    features: list[torch.Tensor]


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


def register_model(name: str):
    """Class/function decorator adding a model constructor to the registry under ``name``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs) -> KDModel:
    """Build a zoo model by name, e.g. ``create_model("resnet8x4", num_classes=100)``."""
    try:
        ctor = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return ctor(num_classes=num_classes, **kwargs)
