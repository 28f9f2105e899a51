"""Shared pieces of the distillation methods: roles, the per-model term bookkeeping, and the ADM
component that every ``<method>+adm`` adds between each teacher and each student."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..losses import ADMLoss, kd_delta
from ..losses.kl import kd_kl, soft_probs
from ..models.base import ModelOutput
from .base import LossOutput, Method

ROLES = ("teacher", "student")

#: Prefixes of the terms whose sum is ``LossOutput.total`` (the others are diagnostics).
LOSS_KINDS = ("ce", "kl", "hint", "adm")


def teachers_of(roles: Sequence[str]) -> list[int]:
    return [i for i, r in enumerate(roles) if r == "teacher"]


def students_of(roles: Sequence[str]) -> list[int]:
    return [i for i, r in enumerate(roles) if r == "student"]


def topology(roles: Sequence[str]) -> str:
    """``"1T1S"``, ``"1T2S"``, ``"2T1S"``, ... (``"3M"`` style when nobody is a teacher)."""
    t, s = len(teachers_of(roles)), len(students_of(roles))
    return f"{t}T{s}S"


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if it is a low-precision float (bf16/fp16 under autocast), else unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def add_term(terms: dict, name: str, value: torch.Tensor) -> None:
    terms[name] = terms[name] + value if name in terms else value


class DistillMethod(Method):
    """Base of kdengine's methods: checks the outputs, collects named terms, adds ADM.

    Subclasses implement ``losses(outputs, target, terms) -> gates`` filling ``terms`` with
    per-model weighted loss terms (``"ce/m"``, ``"kl/m"``, ``"hint/m"``) and diagnostics, and
    return ``None`` or a dict ``{(teacher, student): 0-d gate}`` that scales the teacher's ADM term
    of that pair (SwitOKD's switch). ``forward`` adds the ADM terms (``"adm/m"``) and returns
    ``total = sum of every term whose prefix is in LOSS_KINDS``.
    """

    def __init__(self, roles: Sequence[str], trainable: Sequence[bool], num_classes: int,
                 adm: Optional["ADMPairs"] = None):
        super().__init__()
        self.roles = tuple(roles)
        self.trainable = tuple(bool(t) for t in trainable)
        self.num_classes = int(num_classes)
        self.topology = topology(self.roles)
        self.adm = adm
        self.needs_indices = bool(adm is not None and adm.needs_indices)

    # ---------------------------------------------------------------- schedule

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if self.adm is not None:
            self.adm.start_epoch(epoch, epochs)

    def end_epoch(self, epoch: int) -> None:
        if self.adm is not None:
            self.adm.end_epoch(epoch)

    # ---------------------------------------------------------------- forward

    def losses(self, outputs: Sequence[ModelOutput], target: torch.Tensor, terms: dict):
        raise NotImplementedError  # pragma: no cover

    def _check(self, outputs: Sequence[ModelOutput], target: torch.Tensor, indices) -> None:
        name = type(self).__name__
        if len(outputs) != len(self.roles):
            raise ValueError(
                f"{name}: built for {len(self.roles)} models {self.roles}, got {len(outputs)} outputs"
            )
        for m, out in enumerate(outputs):
            z = out.logits
            if z.dim() != 2 or z.shape[1] != self.num_classes:
                raise ValueError(
                    f"{name}: model {m} logits must be [B, {self.num_classes}], got {tuple(z.shape)}"
                )
        b = outputs[0].logits.shape[0]
        if target.dim() != 1 or target.shape[0] != b:
            raise ValueError(f"{name}: target must be [B] = [{b}], got {tuple(target.shape)}")
        if self.needs_indices:
            if indices is None:
                raise ValueError(
                    f"{name}: ADM di='kd' needs the dataset indices of the batch: "
                    "forward(outputs, target, indices=...)"
                )
            if indices.dim() != 1 or indices.shape[0] != b:
                raise ValueError(f"{name}: indices must be [B] = [{b}], got {tuple(indices.shape)}")

    def forward(self, outputs, target, indices=None) -> LossOutput:
        self._check(outputs, target, indices)
        terms: dict[str, torch.Tensor] = {}
        gates = self.losses(outputs, target, terms)
        if self.adm is not None:
            self.adm(outputs, target, indices, terms, gates)
        total = None
        for key, value in terms.items():
            if key.split("/", 1)[0] in LOSS_KINDS:
                total = value if total is None else total + value
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})

    def extra_repr(self) -> str:
        return f"roles={self.roles}, trainable={self.trainable}"


# -------------------------------------------------------------------------------------- ADM


class ADMTerms(ADMLoss):
    """ADMLoss returning its three parts unweighted: ``(L_co, L_di, L_feat)`` (Eq. 5, 7-8 or
    Eq. 11-12). ``alpha * L_co + beta * L_di + gamma * L_feat`` equals ``ADMLoss.forward``
    (tests/methods pin this); a part whose weight is 0 is not computed (``None``), so a frozen
    teacher's head is never touched by autograd when ``beta = 0``.
    """

    def parts(self, feats_s, feats_t, target, teacher_prev_probs=None, delta=None):
        self._check(feats_s, feats_t, target)
        student_head, teacher_head = self._heads
        pooled_s, pooled_t, _, attn_co_t = self.pooled(feats_s[-1], feats_t[-1])
        tau = self.temperature
        loss_co = loss_di = loss_feat = None
        if self.alpha != 0.0:
            logits_s = student_head(pooled_s)
            if self.co == "ce":  # Eq. 7
                loss_co = F.cross_entropy(logits_s, target)
            else:  # Eq. 11: the teacher's consensus-pooled prediction, detached
                with torch.no_grad():
                    teacher_co = teacher_head(ops.weighted_pool_reference(feats_t[-1], attn_co_t))
                loss_co = kd_kl(logits_s, soft_probs(teacher_co, tau), tau)
        if self.beta != 0.0:
            logits_t = teacher_head(pooled_t)
            if self.di == "ce":  # Eq. 8
                loss_di = F.cross_entropy(logits_t, target)
            else:  # Eq. 12: (1 - delta) * onehot + delta * p_t(previous epoch)
                soft = F.one_hot(target, logits_t.shape[1]).to(logits_t.dtype)
                if teacher_prev_probs is not None:
                    soft = (1 - delta) * soft + delta * teacher_prev_probs.to(logits_t.dtype)
                loss_di = kd_kl(logits_t, soft, tau)
        if self.gamma != 0.0:  # Eq. 5 over stages 1..N-1
            loss_feat = self.feat_loss(feats_s, feats_t)
        return loss_co, loss_di, loss_feat


_BUFFER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ADMPairs(nn.Module):
    """ADM between every (teacher, student) pair (ADM paper Eq. 5-12; Sec. 5.6 for three models).

    Each pair has its own :class:`ADMTerms` (own 1x1 conv + BN connectors where channels differ).
    The student of a pair gets ``alpha * L_co + gamma * L_feat`` and the teacher ``beta * L_di``,
    logged as ``"adm/<model>"`` (summed over that model's pairs; unweighted ``co/``, ``di/``,
    ``feat/`` are diagnostics). Where the two models list different numbers of stages, the last
    ``min(N_s, N_t)`` stages are paired.

    ``di="kd"`` (Eq. 12): the teacher's previous-epoch prediction of each sample lives in a
    ``[2 * num_samples, C]`` buffer per teacher: two halves, read from half ``parity`` and written
    (``index_copy_`` at the batch ``indices``) into half ``1 - parity``; ``end_epoch`` swaps them
    by flipping ``parity`` on the device (no copy, no host sync, graph-safe). A ``valid`` flag per
    row marks the samples written in the previous epoch; rows never written (the first epoch,
    samples a dropped last batch or another rank's shard skipped) fall back to the one-hot label.
    ``delta`` (Eq. 12, linear ``delta_start -> delta_end``) is a buffer set in ``start_epoch``.
    The stored prediction is ``softmax(z_t / tau)`` of the teacher's ordinary logits.
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
    ):
        super().__init__()
        self.pairs = [(int(t), int(s)) for t, s in pairs]
        if not self.pairs:
            raise ValueError("ADM needs at least one (teacher, student) pair")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.co, self.di = co, di
        self.temperature = float(temperature)
        self.delta_start, self.delta_end = float(delta_start), float(delta_end)
        self.losses = nn.ModuleList()
        self.num_stages = []
        for t, s in self.pairs:
            ch_s, ch_t = _stage_channels(models[s], s), _stage_channels(models[t], t)
            k = min(len(ch_s), len(ch_t))
            self.num_stages.append(k)
            self.losses.append(
                ADMTerms(
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
        if self.needs_indices:
            self.delta.fill_(kd_delta(epoch, epochs, self.delta_start, self.delta_end))

    def end_epoch(self, epoch: int) -> None:
        if not self.needs_indices:
            return
        # Swap: what was written this epoch becomes the read half; clear the new write half's
        # flags. Device-side only (no .item()), so it is cheap and never syncs.
        self.parity.copy_(1 - self.parity)
        write_half = (1 - self.parity).view(1)
        for t in self.teachers:
            getattr(self, f"prev_valid_{t}").view(2, self.num_samples).index_fill_(0, write_half, 0.0)

    def previous(self, teacher: int, indices: torch.Tensor):
        """``(probs [B, C], delta [B, 1])`` for ``di="kd"``: the teacher's previous-epoch
        prediction of these samples and the per-sample delta (0 where none was stored)."""
        rows = indices + self.parity * self.num_samples
        probs = getattr(self, f"prev_probs_{teacher}").index_select(0, rows)
        valid = getattr(self, f"prev_valid_{teacher}").index_select(0, rows)
        return probs, (self.delta * valid).unsqueeze(1)

    def record(self, teacher: int, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """Store this epoch's teacher prediction of these samples (into the write half)."""
        rows = indices + (1 - self.parity) * self.num_samples
        buf = getattr(self, f"prev_probs_{teacher}")
        buf.index_copy_(0, rows, soft_probs(logits.float(), self.temperature).to(buf.dtype))
        valid = getattr(self, f"prev_valid_{teacher}")
        valid.index_fill_(0, rows, 1.0)

    # ------------------------------------------------------------------ forward

    def forward(self, outputs, target, indices, terms: dict, gates: Optional[dict] = None) -> None:
        prev = {}
        if self.needs_indices:
            prev = {t: self.previous(t, indices) for t in self.teachers}
        for (t, s), k, loss in zip(self.pairs, self.num_stages, self.losses):
            probs, delta = prev.get(t, (None, None))
            co, di, feat = loss.parts(
                outputs[s].features[-k:], outputs[t].features[-k:], target, probs, delta
            )
            if co is not None:
                add_term(terms, f"co/{s}", co)
                add_term(terms, f"adm/{s}", self.alpha * co)
            if feat is not None:
                add_term(terms, f"feat/{s}", feat)
                add_term(terms, f"adm/{s}", self.gamma * feat)
            if di is not None:
                add_term(terms, f"di/{t}", di)
                weighted = self.beta * di
                if gates is not None and (t, s) in gates:
                    weighted = weighted * gates[(t, s)]
                add_term(terms, f"adm/{t}", weighted)
        if self.needs_indices and self.training:
            for t in self.teachers:
                self.record(t, outputs[t].logits.detach(), indices)

    def extra_repr(self) -> str:
        return (
            f"pairs={self.pairs}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"co={self.co!r}, di={self.di!r}"
        )


def _head(model: nn.Module, index: int) -> nn.Module:
    try:
        return model.head
    except (AttributeError, NotImplementedError):
        raise ValueError(
            f"model {index} ({type(model).__name__}) exposes no classifier `head`, which ADM needs"
        ) from None


def _stage_channels(model: nn.Module, index: int) -> list[int]:
    ch = getattr(model, "stage_channels", None)
    if not ch:
        raise ValueError(
            f"model {index} ({type(model).__name__}) has no `stage_channels`, which ADM and FitNet need"
        )
    return [int(c) for c in ch]


def ce_terms(outputs, target, models: Sequence[int], terms: dict) -> None:
    for m in models:
        terms[f"ce/{m}"] = F.cross_entropy(outputs[m].logits, target)
