"""The ADM component every ``<method>+adm`` adds: ADM between each teacher and each student
(:class:`ADMPairs`), with the previous-epoch teacher predictions of ``di="kd"``; for
segmentation, dense ADM (:class:`~kdengine.losses.DenseADMLoss`) per pair."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..losses.adm import DENSE_FORMS, ADMLoss, DenseADMLoss, kd_delta
from ..losses.kl import soft_probs
from ..losses.segmentation import IGNORE_INDEX
from .base import TASKS, stage_channels

_BUFFER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _add_term(terms: dict, name: str, value: torch.Tensor) -> None:
    terms[name] = terms[name] + value if name in terms else value


def _head(model: nn.Module, index: int) -> nn.Module:
    try:
        return model.head
    except (AttributeError, NotImplementedError):
        raise ValueError(
            f"model {index} ({type(model).__name__}) exposes no classifier `head`, which ADM needs"
        ) from None


def _head_channels(model: nn.Module, index: int) -> int:
    ch = getattr(model, "head_channels", None)
    if not ch:
        raise ValueError(
            f"model {index} ({type(model).__name__}) has no `head_channels`, which dense ADM needs "
            "(a segmentation model's head feature channels)"
        )
    return int(ch)


def _last_stages(output, k: int):
    """``output`` with only its last ``k`` stage features (a ``SegOutput`` is a NamedTuple)."""
    return output if len(output.features) == k else output._replace(features=list(output.features)[-k:])


class ADMPairs(nn.Module):
    """ADM between every (teacher, student) pair (ADM paper Eq. 5-12; Sec. 5.6 for three models).

    Each pair has its own :class:`~kdengine.losses.ADMLoss` (own 1x1 conv + BN connectors where
    channels differ), whose ``parts`` give the unweighted terms. The student of a pair gets
    ``alpha * L_co + gamma * L_feat`` and the teacher ``beta * L_di``, logged as ``"adm/<model>"``
    (summed over that model's pairs; unweighted ``co/``, ``di/``, ``feat/`` are diagnostics).
    Where the two models list different numbers of stages, the last ``min(N_s, N_t)`` stages are
    paired.

    ``di="kd"`` (Eq. 12): the teacher's previous-epoch prediction of each sample lives in a
    ``[2 * num_samples, C]`` buffer per teacher: two halves, read from half ``parity`` and written
    (``index_copy_`` at the batch ``indices``) into half ``1 - parity``; ``end_epoch`` swaps them
    by flipping ``parity`` on the device (no copy, no host sync, graph-safe). A ``valid`` flag per
    row marks the samples written in the previous epoch; rows never written (the first epoch,
    samples a dropped last batch or another rank's shard skipped) fall back to the one-hot label.
    ``delta`` (Eq. 12, linear ``delta_start -> delta_end``) is a buffer set in ``start_epoch``.
    The stored prediction is ``softmax(z_t / tau)`` of the teacher's ordinary logits.

    Segmentation (``task="segmentation"``): each pair's loss is a
    :class:`~kdengine.losses.DenseADMLoss` (S on the head features, L_co / L_di by region pooling
    or per-pixel weighted CE: ``dense``; L_feat on the backbone stages), its ``parts`` called with
    the two ``SegOutput`` s and the label map. Only ``co = di = "ce"`` (Eq. 7-8).

    Args:
        models: every model of the method (their ``head`` and ``stage_channels`` are read).
        pairs: ``(teacher, student)`` indices into ``models``.
        alpha, beta, gamma, co, di, temperature, eps, impl: as :class:`~kdengine.losses.ADMLoss`.
        delta_start, delta_end: Eq. 12's delta at the first and the last epoch (``kd_delta``).
        num_samples: the training-set size (``di="kd"`` only: the buffer's rows).
        num_classes: the logits' width (``di="kd"`` only).
        buffer_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the stored predictions.
        task: ``"classification"`` or ``"segmentation"``.
        dense: (segmentation) ``"region"`` (default) or ``"pixel"``; must be None for
            classification.
        ignore_index: (segmentation) the label that counts nowhere.

    Raises:
        ValueError: no pairs, a model without ``head`` or ``stage_channels`` (segmentation: or
            ``head_channels``), for ``di="kd"`` a missing ``num_samples`` / ``num_classes`` or an
            unknown ``buffer_dtype``; an unknown task, ``dense`` for classification, an unknown
            ``dense``, ``"kd"`` variants or no ``num_classes`` for segmentation.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        pairs: Sequence[tuple[int, int]],
        *,
        alpha: float,
        beta: float,
        gamma: float,
        co: str = "ce",
        di: str = "ce",
        temperature: float = 1.0,
        eps: float = 1e-5,
        impl: Optional[str] = None,
        delta_start: float = 0.2,
        delta_end: float = 0.6,
        num_samples: Optional[int] = None,
        num_classes: Optional[int] = None,
        buffer_dtype: str = "float32",
        task: str = "classification",
        dense: Optional[str] = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        self.pairs = [(int(t), int(s)) for t, s in pairs]
        if not self.pairs:
            raise ValueError("ADM needs at least one (teacher, student) pair")
        if task not in TASKS:
            raise ValueError(f"ADM task must be one of {TASKS}, got {task!r}")
        if task == "classification" and dense is not None:
            raise ValueError(f"ADM dense={dense!r} applies to task='segmentation' only")
        if task == "segmentation":
            dense = "region" if dense is None else dense
            if dense not in DENSE_FORMS:
                raise ValueError(f"ADM dense must be one of {DENSE_FORMS}, got {dense!r}")
            if co != "ce" or di != "ce":
                raise ValueError(
                    f"ADM for segmentation supports co='ce' and di='ce' only (Eq. 7-8; the 'kd' variants would "
                    f"need per-pixel previous-epoch teacher maps), got co={co!r}, di={di!r}"
                )
            if not num_classes:
                raise ValueError("ADM for segmentation needs num_classes (the classes it pools)")
        self.task, self.dense = task, dense
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.co, self.di = co, di
        self.temperature = float(temperature)
        self.delta_start, self.delta_end = float(delta_start), float(delta_end)
        self.losses = nn.ModuleList()
        self.num_stages = []
        for t, s in self.pairs:
            ch_s, ch_t = stage_channels(models[s], s), stage_channels(models[t], t)
            k = min(len(ch_s), len(ch_t))
            self.num_stages.append(k)
            if task == "segmentation":
                self.losses.append(
                    DenseADMLoss(
                        _head(models[s], s), _head(models[t], t), alpha, beta, gamma,
                        num_classes=int(num_classes), dense=dense, ignore_index=ignore_index,
                        student_channels=ch_s[-k:], teacher_channels=ch_t[-k:],
                        student_head_channels=_head_channels(models[s], s),
                        teacher_head_channels=_head_channels(models[t], t), eps=eps, impl=impl,
                    )
                )
                continue
            self.losses.append(
                ADMLoss(
                    _head(models[s], s), _head(models[t], t), alpha, beta, gamma, co, di,
                    student_channels=ch_s[-k:], teacher_channels=ch_t[-k:],
                    temperature=temperature, eps=eps, impl=impl,
                )
            )
        self.teachers = sorted({t for t, _ in self.pairs})
        self.needs_indices = di == "kd" and self.beta != 0.0
        if self.needs_indices:
            if not num_samples or num_samples <= 0:
                raise ValueError("ADM di='kd' needs num_samples (the training set size) for its buffer")
            if not num_classes:
                raise ValueError("ADM di='kd' needs num_classes for its buffer")
            if buffer_dtype not in _BUFFER_DTYPES:
                raise ValueError(
                    f"ADM buffer_dtype must be one of {sorted(_BUFFER_DTYPES)}, got {buffer_dtype!r}"
                )
            self.num_samples = int(num_samples)
            dtype = _BUFFER_DTYPES[buffer_dtype]
            for t in self.teachers:
                self.register_buffer(f"prev_probs_{t}", torch.zeros(2 * self.num_samples, num_classes, dtype=dtype))
                self.register_buffer(f"prev_valid_{t}", torch.zeros(2 * self.num_samples))
            self.register_buffer("parity", torch.zeros((), dtype=torch.long))
            self.register_buffer("delta", torch.tensor(kd_delta(0, 2, self.delta_start, self.delta_end)))

    # ------------------------------------------------------------------ schedule

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Set ``delta`` for ``epoch`` (0-based) of ``epochs`` (``di="kd"`` only)."""
        if self.needs_indices:
            self.delta.fill_(kd_delta(epoch, epochs, self.delta_start, self.delta_end))

    def end_epoch(self, epoch: int) -> None:
        """Swap the halves of the previous-epoch buffers (``di="kd"`` only)."""
        if not self.needs_indices:
            return
        # Swap: what was written this epoch becomes the read half; clear the new write half's
        # flags. Device-side only (no .item()), so it is cheap and never syncs.
        self.parity.copy_(1 - self.parity)
        write_half = (1 - self.parity).view(1)
        for t in self.teachers:
            getattr(self, f"prev_valid_{t}").view(2, self.num_samples).index_fill_(0, write_half, 0.0)

    def previous(self, teacher: int, indices: torch.Tensor):
        """The teacher's previous-epoch prediction of these samples, for ``di="kd"``.

        Args:
            teacher: the teacher's model index.
            indices: the dataset indices of the batch, ``[B]``.

        Returns:
            ``(probs [B, C], delta [B, 1])``: the stored probabilities and the per-sample delta
            (0 where none was stored, so that the target is the one-hot label).
        """
        rows = indices + self.parity * self.num_samples
        probs = getattr(self, f"prev_probs_{teacher}").index_select(0, rows)
        valid = getattr(self, f"prev_valid_{teacher}").index_select(0, rows)
        return probs, (self.delta * valid).unsqueeze(1)

    def record(self, teacher: int, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """Store this epoch's teacher prediction of these samples (into the write half).

        Args:
            teacher: the teacher's model index.
            logits: its logits for the batch, ``[B, C]``.
            indices: the dataset indices of the batch, ``[B]``.
        """
        rows = indices + (1 - self.parity) * self.num_samples
        buf = getattr(self, f"prev_probs_{teacher}")
        buf.index_copy_(0, rows, soft_probs(logits.float(), self.temperature).to(buf.dtype))
        valid = getattr(self, f"prev_valid_{teacher}")
        valid.index_fill_(0, rows, 1.0)

    # ------------------------------------------------------------------ forward

    def forward(self, outputs, target, indices, terms: dict, gates: Optional[dict] = None) -> None:
        """Add each pair's ADM terms to ``terms``.

        Args:
            outputs: every model's ``ModelOutput`` (segmentation: ``SegOutput``).
            target: the labels, ``[B]`` (segmentation: the label map ``[B, H, W]``).
            indices: the dataset indices of the batch (``di="kd"``), else unused.
            terms: the method's term dict, extended in place (``co/``, ``di/``, ``feat/``,
                ``adm/`` per model).
            gates: optional ``{(teacher, student): 0-d gate}`` scaling that pair's ``beta * L_di``.
        """
        prev = {}
        if self.needs_indices:
            prev = {t: self.previous(t, indices) for t in self.teachers}
        for (t, s), k, loss in zip(self.pairs, self.num_stages, self.losses):
            if self.task == "segmentation":
                co, di, feat = loss.parts(_last_stages(outputs[s], k), _last_stages(outputs[t], k), target)
            else:
                probs, delta = prev.get(t, (None, None))
                co, di, feat = loss.parts(
                    outputs[s].features[-k:], outputs[t].features[-k:], target, probs, delta
                )
            if co is not None:
                _add_term(terms, f"co/{s}", co)
                _add_term(terms, f"adm/{s}", self.alpha * co)
            if feat is not None:
                _add_term(terms, f"feat/{s}", feat)
                _add_term(terms, f"adm/{s}", self.gamma * feat)
            if di is not None:
                _add_term(terms, f"di/{t}", di)
                weighted = self.beta * di
                if gates is not None and (t, s) in gates:
                    weighted = weighted * gates[(t, s)]
                _add_term(terms, f"adm/{t}", weighted)
        if self.needs_indices and self.training:
            for t in self.teachers:
                self.record(t, outputs[t].logits.detach(), indices)

    def extra_repr(self) -> str:
        dense = f", dense={self.dense!r}" if self.dense is not None else ""
        return (
            f"pairs={self.pairs}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"co={self.co!r}, di={self.di!r}{dense}"
        )
