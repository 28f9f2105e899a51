"""The contract between a distillation method and the training engine."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from ..models.base import ModelOutput


class LossOutput(NamedTuple):
    """``total``: the scalar the engine calls ``backward`` on once (the sum over models).
    ``terms``: named scalars for logging (e.g. ``"ce/1"``, ``"kl/0"``, ``"adm/1"``), detached;
    they stay on the device: the engine accumulates them without host syncs."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class Method(nn.Module):
    """A distillation method: the losses of M models' outputs for one batch.

    The engine owns the models and passes them in at construction (their heads and stage
    channels are what ADM and FitNet need); the method owns only its own parameters
    (connectors, regressors), which the engine optimises along with the trainable models.

    Class attributes / attributes the engine reads:
        trainable: one bool per model; ``False`` models (offline teachers) run in eval mode
            under ``torch.no_grad`` and are not optimised.
        needs_indices: the method wants the dataset indices of each batch (``forward(...,
            indices=)``), e.g. ADM's ``di="kd"`` variant with its previous-epoch teacher
            predictions.

    Anything that changes over training (a schedule's delta, a warm-up factor) lives in a
    buffer updated by ``start_epoch`` with ``fill_``/``copy_``, never as a Python float read in
    ``forward``: a CUDA graph captured once must see the new value on replay. For the same reason
    ``forward`` has no host syncs (no ``.item()``, no Python branches on tensor values).
    """

    trainable: tuple[bool, ...]
    needs_indices: bool = False

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (0-based) of ``epochs``."""

    def end_epoch(self, epoch: int) -> None:
        """Called after each epoch's last step."""

    def step_gates(self) -> Optional[torch.Tensor]:
        """Optional per-model optimizer gates, read by the engine after each ``forward``.

        ``None`` (the default): every trainable model steps every iteration. Otherwise a float
        tensor ``[M]`` on the device (a buffer the method rewrites in ``forward``, so its address
        is fixed for CUDA graphs) holding 1.0 where model m steps this iteration and 0.0 where its
        optimizer step is skipped entirely (parameters, momentum and weight decay unchanged), e.g.
        SwitOKD's teacher in expert ("downtime") mode, whose reference code does not call
        ``optimizer.step()`` then. The method already zeroes that model's loss terms, so an engine
        that ignores the gates still gives the model a zero gradient (but momentum and weight decay
        keep moving it).
        """
        return None

    def forward(
        self,
        outputs: Sequence[ModelOutput],
        target: torch.Tensor,
        indices: Optional[torch.Tensor] = None,
    ) -> LossOutput:  # pragma: no cover - every method overrides
        raise NotImplementedError
