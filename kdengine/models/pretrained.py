"""Pretrained weights for a zoo model: ``load_pretrained(model, path, index, default_index)``.

Accepted files (all read with ``map_location="cpu"``):
- kdengine checkpoints: a dict with ``"models"`` (one state dict per model of the run) and
  ``"config"``; ``index`` picks the model.
- the CIFAR-KD zoo's teachers (CRD's ``train_teacher.py``, which mdistiller's ``download_ckpts``
  ships, e.g. ``resnet32x4_vanilla/ckpt_epoch_240.pth``) and mdistiller's ``student_*`` files:
  ``{"model": state_dict, "epoch": ..., ...}``.
- ``{"state_dict": state_dict}`` and plain state dicts (torchvision's).

Keys saved from an ``nn.DataParallel`` / DDP wrapper lose their ``module.`` prefix. The zoo's
``ResNet18`` / ``ResNet50`` (``resnetv2.py``) are our ``resnet18_cifar`` / ``resnet50_cifar``
with torchvision's names, so their ``shortcut`` is renamed ``downsample`` and ``linear`` ``fc``.
A key is renamed only where the model lacks the saved name and has the renamed one (the
ShuffleNets' classifier *is* ``linear``). Loading is strict: missing or unexpected keys, or
shapes that differ, raise a ``ValueError`` naming them.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

# The CRD zoo's resnetv2.py name -> torchvision's name, for whole dotted path components.
_ZOO_RENAMES = ((re.compile(r"(^|\.)shortcut\."), r"\1downsample."), (re.compile(r"^linear\."), "fc."))
_MODULE_PREFIX = "module."
_MAX_LISTED = 12  # keys named in an error message; the rest are counted


def read_checkpoint(path: os.PathLike | str) -> Any:
    """The object saved at ``path``, tensors on the CPU.

    ``weights_only=True`` first (tensors and plain containers only). kdengine's own checkpoints
    hold NumPy RNG states and CRD's ``*_last.pth`` an ``argparse.Namespace``, which it refuses;
    those are read with full unpickling, so ``path`` must be a file you trust.

    Args:
        path: a file written by ``torch.save``.

    Returns:
        The unpickled object.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read (truncated, not a ``torch.save`` file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":  # timm / Hugging Face hub files
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"checkpoint {path} is a .safetensors file: pip install safetensors to read it") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ValueError(f"checkpoint {path} could not be read: {exc}") from exc
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"checkpoint {path} could not be read: {exc}") from exc


def _select_state(obj: Any, index: Optional[int], default_index: int, path: str) -> Mapping[str, Any]:
    """The state dict inside a checkpoint of one of the accepted layouts."""
    if isinstance(obj, Mapping) and "models" in obj and "config" in obj:
        models = obj["models"]
        if index is None:
            index = default_index if default_index < len(models) else 0
        if not 0 <= index < len(models):
            raise ValueError(f"{path} holds {len(models)} models; index {index} is out of range")
        return models[index]
    if index is not None:
        raise ValueError(f"{path} is not a kdengine checkpoint: it holds one model, so no model index applies")
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path} holds no state dict: expected a kdengine checkpoint, {{'model': state_dict}}, "
                     f"{{'state_dict': state_dict}} or a state dict")


def _rename(key: str, expected: set[str]) -> str:
    """``key`` as the model names it: as saved if the model has it, else without a DataParallel
    prefix and/or in torchvision's naming of the zoo's CIFAR ResNets, where that name exists."""
    candidates = [key]
    if key.startswith(_MODULE_PREFIX):
        candidates.append(key[len(_MODULE_PREFIX):])
    for name in list(candidates):
        renamed = name
        for pattern, repl in _ZOO_RENAMES:
            renamed = pattern.sub(repl, renamed)
        candidates.append(renamed)
    return next((c for c in candidates if c in expected), key)


def _listed(keys: set[str]) -> str:
    shown = sorted(keys)[:_MAX_LISTED]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" ... and {more} more" if more else "")


def adapt_state_dict(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with its keys named as ``model`` names them (see the module docstring).

    Args:
        model: the model the weights are for.
        state: a state dict in kdengine's, torchvision's or the CIFAR-KD zoo's naming.

    Returns:
        A new state dict with exactly ``model``'s keys.

    Raises:
        ValueError: keys are missing or left over after renaming, or shapes differ (the
            message lists each kind), or two saved keys map to the same name.
    """
    own = model.state_dict()
    expected = set(own)
    adapted: dict[str, Any] = {}
    for key, value in state.items():
        name = _rename(key, expected)
        if name in adapted:
            raise ValueError(f"two saved keys map to {name!r}")
        adapted[name] = value
    missing, unexpected = expected - adapted.keys(), adapted.keys() - expected
    resized = {f"{k} {tuple(adapted[k].shape)} saved, {tuple(own[k].shape)} in the model"
               for k in expected & adapted.keys()
               if isinstance(adapted[k], torch.Tensor) and adapted[k].shape != own[k].shape}
    parts = [f"{what}: {_listed(keys)}" for what, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ", resized)) if keys]
    if parts:
        raise ValueError("; ".join(parts))
    return adapted


def load_pretrained(model: nn.Module, path: os.PathLike | str, index: Optional[int], default_index: int) -> None:
    """Load weights into ``model`` (in place, strict).

    Args:
        model: the freshly built model.
        path: a kdengine checkpoint, a CIFAR-KD zoo file or a state dict (module docstring).
        index: which model of a kdengine checkpoint; ``None`` for the other layouts (one model
            each) or to use ``default_index``.
        default_index: the model taken from a kdengine checkpoint when ``index`` is None (the
            loading model's own position in the run), or the first if the checkpoint holds
            fewer models.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable file, index out of range (or given for a one-model file), or
            weights that do not fit ``model``: the message names the file, the model's class and
            the offending keys or shapes.
    """
    state = _select_state(read_checkpoint(path), index, default_index, str(path))
    remap = getattr(model, "remap_state_dict", None)
    if remap is not None:  # timm-layout models also read their official / older-timm layouts
        state = remap(dict(state))
    try:
        model.load_state_dict(adapt_state_dict(model, state), strict=True)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: whatever load_state_dict still refuses
        raise ValueError(f"weights in {path} do not fit {type(model).__name__}: {exc}") from None
