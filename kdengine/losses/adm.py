"""ADM: Asymmetric Decision-Making (ICML 2025), paper Eq. 5-12 and Algorithm 1."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..models.base import KDModel
from .kl import kd_kl, soft_probs

VARIANTS = ("ce", "kd")


def kd_delta(epoch: int, epochs: int, start: float = 0.2, end: float = 0.6) -> float:
    """The trust in the teacher's previous-epoch prediction for ``di="kd"`` (Eq. 12).

    Args:
        epoch: the current epoch, 0-based.
        epochs: the number of epochs of the run.
        start, end: delta at the first and at the last epoch.

    Returns:
        delta, rising linearly from ``start`` at epoch 0 to ``end`` at epoch ``epochs - 1``.
    """
    if epochs <= 1:
        return end
    return start + (end - start) * min(max(epoch, 0), epochs - 1) / (epochs - 1)


def _connector(in_channels: int, out_channels: int) -> nn.Module:
    """phi: 1x1 conv + BN mapping student channels to the teacher's (Eq. 5)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _to_size(x: torch.Tensor, size: tuple) -> torch.Tensor:
    """Area-pool a feature map down to ``size`` (no-op when already there)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def _check_head(arg: str, head, channels: Optional[Sequence[int]]) -> None:
    """Reject what cannot be a classifier head before it fails deep inside a forward pass."""
    # A whole zoo model where its head is meant would get a [B, C] pool as an image and fail in
    # conv2d; calling it to find out would run its BNs in train mode, so check the type instead.
    if isinstance(head, KDModel):
        raise ValueError(
            f"ADMLoss: {arg} must be the model's classifier head (e.g. model.head), mapping the "
            f"[B, C_last] pool to logits, got the whole model {type(head).__name__}"
        )
    if not callable(head):
        raise ValueError(f"ADMLoss: {arg} must be a module mapping [B, C_last] to logits, got {type(head).__name__}")
    if channels is not None and isinstance(head, nn.Linear) and head.in_features != int(channels[-1]):
        raise ValueError(
            f"ADMLoss: {arg} takes {head.in_features} features, but the last stage has {int(channels[-1])} "
            "channels (the head is applied to that stage's pool)"
        )


class ADMLoss(nn.Module):
    """``alpha * L_co + beta * L_di + gamma * L_feat`` (Eq. 9-10 without the DML term).

    Drop-in for Algorithm 1: the paper's ``ADM(tea, stu, alpha, beta, gamma)`` becomes
    ``ADMLoss(stu.fc, tea.fc, alpha, beta, gamma)`` and ``loss = adm(feat_stu, feat_tea, target)``
    gives the same numbers (with the [B, 1, H, W] attention maps of Eq. 7-8), computed by the fused
    ``adm_pool`` and ``feature_mse`` ops. ``parts`` returns the three terms unweighted (what the
    methods log per model); ``forward`` is their weighted sum.

    Connectors phi are built only where a stage's channels differ and the stage is used: the last
    stage (for S and L_feat) and, when ``gamma != 0``, stages 1 .. N-2 (L_feat skips stage 0).
    Unused stages hold an ``nn.Identity`` so that the state-dict keys of the others keep their
    stage index. S carries no gradient (Algorithm 1 detaches it), so the last stage's connector
    learns only from L_feat: with ``gamma = 0`` its parameters are frozen (``requires_grad``
    False) rather than handed to an optimizer that would never move them.

    Args:
        student_head: the student's classifier ``W^s``, applied to the consensus-weighted global
            average pool of the student's last stage, ``[B, C_s]``. Not the whole model.
        teacher_head: the teacher's classifier ``W^t``, applied to its divergence-weighted pool.
        alpha, beta, gamma: weights of L_co, L_di and L_feat.
        co, di: ``"ce"`` (Eq. 7-8) or ``"kd"`` (Eq. 11-12).
        student_channels, teacher_channels: per-stage channel counts; where they differ a
            1x1 conv + BN connector phi maps the student's stage to the teacher's for S and L_feat
            (the student still pools its own map).
        temperature: tau of the ``kd`` variants (paper: 1).
        eps: the attention denominators' epsilon (Algorithm 1: 1e-5).
        impl: backend of the fused ops (None: the compiled kernel of the tensors' device).

    Raises:
        ValueError: an unknown variant, only one of the channel lists, lists of different
            lengths, or a head that is a whole model or does not take the last stage's channels.
    """

    def __init__(
        self,
        student_head: nn.Module,
        teacher_head: nn.Module,
        alpha: float,
        beta: float,
        gamma: float,
        co: str = "ce",
        di: str = "ce",
        *,
        student_channels: Optional[Sequence[int]] = None,
        teacher_channels: Optional[Sequence[int]] = None,
        temperature: float = 1.0,
        eps: float = 1e-5,
        impl: Optional[str] = None,
    ):
        super().__init__()
        if co not in VARIANTS or di not in VARIANTS:
            raise ValueError(f"ADMLoss: co and di must be one of {VARIANTS}, got co={co!r}, di={di!r}")
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("ADMLoss: give both student_channels and teacher_channels, or neither")
        if student_channels is not None and len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"ADMLoss: student_channels {list(student_channels)} and teacher_channels "
                f"{list(teacher_channels)} must list the same number of stages"
            )
        _check_head("student_head", student_head, student_channels)
        _check_head("teacher_head", teacher_head, teacher_channels)
        # Heads are the models' own classifiers: referenced, not owned (no double registration).
        self._heads = (student_head, teacher_head)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.co, self.di = co, di
        self.temperature, self.eps, self.impl = temperature, eps, impl
        self.connectors = nn.ModuleList()
        if student_channels is not None:
            n = len(student_channels)
            for i, (cs, ct) in enumerate(zip(student_channels, teacher_channels)):
                used = i == n - 1 or (i > 0 and self.gamma != 0.0)
                self.connectors.append(_connector(cs, ct) if cs != ct and used else nn.Identity())
            if self.gamma == 0.0:
                self.connectors[-1].requires_grad_(False)

    # ------------------------------------------------------------------ pieces

    def _mapped(self, idx: int, feat_s: torch.Tensor) -> torch.Tensor:
        return self.connectors[idx](feat_s) if len(self.connectors) else feat_s

    def _check(self, feats_s, feats_t, target) -> None:
        if len(feats_s) != len(feats_t) or len(feats_s) == 0:
            raise ValueError(
                f"ADMLoss: feats_s and feats_t must list the same stages, got {len(feats_s)} "
                f"and {len(feats_t)}"
            )
        if len(self.connectors) and len(self.connectors) != len(feats_s):
            raise ValueError(
                f"ADMLoss: built for {len(self.connectors)} stages, got {len(feats_s)} features"
            )
        for i, (fs, ft) in enumerate(zip(feats_s, feats_t)):
            if fs.dim() != 4 or ft.dim() != 4 or fs.shape[0] != ft.shape[0]:
                raise ValueError(
                    f"ADMLoss: stage {i} features must be [B, C, H, W] with one B, got feats_s "
                    f"{tuple(fs.shape)} and feats_t {tuple(ft.shape)}"
                )
            if fs.shape[1] != ft.shape[1] and not len(self.connectors):
                raise ValueError(
                    f"ADMLoss: stage {i} channels differ (feats_s {tuple(fs.shape)}, feats_t "
                    f"{tuple(ft.shape)}); pass student_channels and teacher_channels to add connectors"
                )
        b = feats_s[0].shape[0]
        if not ((target.dim() == 1 or target.dim() == 2) and target.shape[0] == b):
            raise ValueError(
                f"ADMLoss: target must be class indices [B] = [{b}] or class probabilities [B, K] "
                f"(mixup / cutmix), got {tuple(target.shape)}"
            )

    @staticmethod
    def _check_previous(teacher_prev_probs, delta, logits_t: torch.Tensor) -> None:
        if teacher_prev_probs.shape != logits_t.shape:
            raise ValueError(
                f"ADMLoss: teacher_prev_probs must be {tuple(logits_t.shape)}, got "
                f"{tuple(teacher_prev_probs.shape)}"
            )
        if delta is None:
            raise ValueError("ADMLoss: di='kd' with teacher_prev_probs needs delta (see kd_delta)")
        if isinstance(delta, torch.Tensor) and delta.dim() != 0 and tuple(delta.shape) != (logits_t.shape[0], 1):
            raise ValueError(
                f"ADMLoss: delta must be a float, a 0-d tensor or [B, 1] = [{logits_t.shape[0]}, 1], "
                f"got {tuple(delta.shape)}"
            )

    def feat_loss(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
        """``L_feat = sum_{i=1}^{N-1} mse(phi(F_s[i]), F_t[i].detach()) / 2^(N-i)`` (Eq. 5; stage 0
        skipped, as Algorithm 1). Where spatial sizes differ the larger map is area-pooled to the
        smaller.

        Args:
            feats_s, feats_t: the N stage features of each model (checked by ``parts``).

        Returns:
            The 0-d loss; only the student side (and phi) receives a gradient.
        """
        n = len(feats_s)
        loss = feats_s[0].new_zeros(())
        for i in range(1, n):
            fs, ft = self._mapped(i, feats_s[i]), feats_t[i].detach()
            size = min(fs.shape[-2:], ft.shape[-2:], key=lambda hw: hw[0] * hw[1])
            fs, ft = _to_size(fs, size), _to_size(ft, size)
            loss = loss + ops.feature_mse(fs, ft.to(fs.dtype), impl=self.impl) / 2 ** (n - i)
        return loss

    def pooled(self, feat_s: torch.Tensor, feat_t: torch.Tensor):
        """The attention-weighted pools of the last stage (Eq. 6-8).

        Args:
            feat_s, feat_t: the last stage of each model, ``[B, C, H, W]``.

        Returns:
            ``(pooled_s, pooled_t, attn_co_s, attn_co_t)``: the consensus-weighted student pool,
            the divergence-weighted teacher pool, and the consensus map at each model's resolution.
        """
        idx = len(self.connectors) - 1
        mapped = self._mapped(idx, feat_s) if idx >= 0 else feat_s
        if mapped is feat_s and feat_s.shape == feat_t.shape:
            pooled_s, pooled_t, attn_co, _ = ops.adm_pool(
                feat_s, feat_t, eps=self.eps, impl=self.impl, return_attention=True
            )
            return pooled_s, pooled_t, attn_co, attn_co
        # Unequal channels or sizes: S at the smaller resolution, resized (nearest) where needed.
        size = min(mapped.shape[-2:], feat_t.shape[-2:], key=lambda hw: hw[0] * hw[1])
        with torch.no_grad():
            attn_co, attn_di = ops.adm_attention_reference(
                _to_size(mapped, size), _to_size(feat_t, size).to(mapped.dtype), self.eps
            )

        def at(attn, like):
            if tuple(attn.shape[-2:]) == tuple(like.shape[-2:]):
                return attn
            return F.interpolate(attn.unsqueeze(1), size=like.shape[-2:], mode="nearest").squeeze(1)

        attn_co_s, attn_co_t = at(attn_co, feat_s), at(attn_co, feat_t)
        pooled_s = ops.weighted_pool_reference(feat_s, attn_co_s)
        pooled_t = ops.weighted_pool_reference(feat_t, at(attn_di, feat_t))
        return pooled_s, pooled_t, attn_co_s, attn_co_t

    def parts(
        self,
        feats_s: Sequence[torch.Tensor],
        feats_t: Sequence[torch.Tensor],
        target: torch.Tensor,
        teacher_prev_probs: Optional[torch.Tensor] = None,
        delta: Union[float, torch.Tensor, None] = None,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """ADM's three terms, unweighted: ``(L_co, L_di, L_feat)``.

        A term whose weight is 0 is not computed and is ``None``: with ``beta = 0`` the teacher's
        head is never applied, so a frozen teacher is never touched by autograd.

        Args:
            feats_s, feats_t: the stage features of each model (before the final ReLU), same
                number of stages, ``[B, C_i, H_i, W_i]``.
            target: the labels, ``[B]``, or class probabilities ``[B, K]`` (mixed batches; the
                cross-entropies and Eq. 12's label term take them as they are).
            teacher_prev_probs: for ``di="kd"``, the teacher's previous-epoch probabilities of
                these samples, ``[B, num_classes]``; None (the first epoch): the one-hot label.
            delta: for ``di="kd"`` with ``teacher_prev_probs``, the trust in them (``kd_delta``):
                a float, a 0-d tensor or a per-sample ``[B, 1]`` tensor.

        Returns:
            ``(co, di, feat)``: Eq. 7 or 11, Eq. 8 or 12, Eq. 5, each a 0-d tensor or None.

        Raises:
            ValueError: features, target, ``teacher_prev_probs`` or ``delta`` of the wrong shape,
                or ``teacher_prev_probs`` without ``delta``.
        """
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
                # the label as a distribution: one-hot, or the soft target itself (mixup / cutmix)
                soft = target.to(logits_t.dtype) if target.dim() == 2 else \
                    F.one_hot(target, logits_t.shape[1]).to(logits_t.dtype)
                if teacher_prev_probs is not None:
                    self._check_previous(teacher_prev_probs, delta, logits_t)
                    soft = (1 - delta) * soft + delta * teacher_prev_probs.to(logits_t.dtype)
                loss_di = kd_kl(logits_t, soft, tau)
        if self.gamma != 0.0:  # Eq. 5 over stages 1..N-1
            loss_feat = self.feat_loss(feats_s, feats_t)
        return loss_co, loss_di, loss_feat

    def forward(
        self,
        feats_s: Sequence[torch.Tensor],
        feats_t: Sequence[torch.Tensor],
        target: torch.Tensor,
        *,
        teacher_prev_probs: Optional[torch.Tensor] = None,
        delta: Union[float, torch.Tensor, None] = None,
    ) -> torch.Tensor:
        """``alpha * L_co + beta * L_di + gamma * L_feat`` (see ``parts`` for the arguments).

        Returns:
            The 0-d loss (zero when every weight is 0).
        """
        weighted = [
            w * part
            for w, part in zip((self.alpha, self.beta, self.gamma),
                               self.parts(feats_s, feats_t, target, teacher_prev_probs, delta))
            if part is not None
        ]
        if not weighted:
            return feats_s[0].new_zeros(())
        loss = weighted[0]
        for term in weighted[1:]:
            loss = loss + term
        return loss
