"""What training (:class:`~.trainer.Trainer`) and evaluation (``kdengine eval``) set up alike: the
device (and, under torchrun, the process group), the precision and memory layout, the models
and autocast. Both import it, so a checkpoint is evaluated as its run trained.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from ..models import create_model, load_pretrained
from .config import num_classes_of
from .distributed import DistContext, local_rank_from_env


def device_type(name: str) -> str:
    """``"cuda"`` or ``"cpu"``: the kind of device the ``train.device`` setting ``name`` selects
    (``auto``: CUDA when torch sees a GPU)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def resolve_device(name: str, rank_on_node: int = 0) -> torch.device:
    """The device of ``train.device=name`` for this process, made CUDA's current device.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        rank_on_node: this process's rank on its machine (torchrun's ``LOCAL_RANK``): plain
            ``cuda`` and ``auto`` mean GPU number ``rank_on_node``.

    Returns:
        The device.

    Raises:
        RuntimeError: a CUDA device is asked for and torch sees none.
    """
    if device_type(name) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but this torch build sees no CUDA device")
    device = torch.device(f"cuda:{rank_on_node}" if name in ("auto", "cuda") else name)
    torch.cuda.set_device(device)
    return device


def device_and_processes(name: str) -> tuple[torch.device, DistContext]:
    """This process's device, then the process group torchrun describes (a world of one
    otherwise). In that order: NCCL binds each rank to the device that is current when the group
    is created.

    Args:
        name: the ``train.device`` setting.

    Returns:
        ``(device, dist)``.
    """
    device = resolve_device(name, local_rank_from_env())
    return device, DistContext.from_env(device)


@dataclass(frozen=True)
class Precision:
    """How a run computes: bf16 autocast or fp32, and the memory layout of models and images."""

    device: torch.device
    autocast_dtype: Optional[torch.dtype]  # None: fp32, no autocast
    channels_last: bool

    @classmethod
    def of(cls, train_cfg, device: torch.device) -> "Precision":
        """The rule of the ``train`` settings: ``precision=auto`` is bf16 autocast on CUDA and fp32
        elsewhere; ``channels_last`` unset means on CUDA.

        Args:
            train_cfg: the ``train`` section (``precision``, ``channels_last``).
            device: the run's device.

        Returns:
            The precision.
        """
        on_cuda = device.type == "cuda"
        bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and on_cuda)
        channels_last = train_cfg.channels_last if train_cfg.channels_last is not None else on_cuda
        return cls(device, torch.bfloat16 if bf16 else None, bool(channels_last))

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the loaders yield images in (the autocast dtype: no cast in the first layer)."""
        return self.autocast_dtype or torch.float32

    def autocast(self, cache_enabled: bool = True):
        """The autocast context of the forward passes (a null context in fp32).

        Args:
            cache_enabled: autocast's cache of cast weights; off inside a captured CUDA graph,
                where the cached copies would be stale after each step.

        Returns:
            A context manager.
        """
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache_enabled)


def build_models(cfg: DictConfig, precision: Precision, weights: Optional[Sequence[dict]] = None) -> nn.ModuleList:
    """The zoo models of ``cfg.models`` with their weights, on the device in the run's layout.

    Args:
        cfg: the experiment configuration.
        precision: the run's device and layout.
        weights: one state dict per model (evaluation of a checkpoint); None: each model's
            ``checkpoint`` setting where given (pretrained weights), else its initialisation.

    Returns:
        The models, in ``cfg.models`` order.
    """
    models = nn.ModuleList()
    for i, spec in enumerate(cfg.models):
        model = create_model(spec.name, num_classes=num_classes_of(cfg), **dict(spec.kwargs))
        if weights is not None:
            model.load_state_dict(weights[i])
        elif spec.checkpoint:
            load_pretrained(model, spec.checkpoint, spec.checkpoint_model, default_index=i)
        models.append(model.to(precision.device, memory_format=precision.memory_format))
    return models


def model_tags(cfg: DictConfig) -> list[str]:
    """The models' names in metrics: ``teacher``, ``student`` — or ``student1``, ``student2``
    when a role repeats."""
    roles = [m.role for m in cfg.models]
    tags, seen = [], {}
    for role in roles:
        seen[role] = seen.get(role, 0) + 1
        tags.append(f"{role}{seen[role]}" if roles.count(role) > 1 else role)
    return tags


def run_method_options(cfg: DictConfig) -> dict:
    """The keyword options ``build_method`` gets for a run: ``method.options``, with a
    segmentation run's ``seg.ignore_index`` taken from ``data.ignore_index`` (the label the data
    pads with), so the two can never disagree (validation refuses a different one)."""
    options = OmegaConf.to_container(cfg.method.options, resolve=True)
    if cfg.data.task == "segmentation":
        options.setdefault("seg", {})["ignore_index"] = int(cfg.data.ignore_index)
    return options
