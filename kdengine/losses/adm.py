"""ADM: Asymmetric Decision-Making (ICML 2025), paper Eq. 5-12 and Algorithm 1."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .kl import kd_kl, soft_probs

VARIANTS = ("ce", "kd")


def kd_delta(epoch: int, epochs: int, start: float = 0.2, end: float = 0.6) -> float:
    """The trust in the teacher's previous-epoch prediction for ``di="kd"`` (Eq. 12): rises
    linearly from ``start`` at epoch 0 to ``end`` at the last epoch."""
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


class ADMLoss(nn.Module):
    """``alpha * L_co + beta * L_di + gamma * L_feat`` (Eq. 9-10 without the DML term).

    Drop-in for Algorithm 1: the paper's ``ADM(tea, stu, alpha, beta, gamma)`` becomes
    ``ADMLoss(stu.fc, tea.fc, alpha, beta, gamma)`` and ``loss = adm(feat_stu, feat_tea, target)``
    gives the same numbers (with the [B, 1, H, W] attention maps of Eq. 7-8, see DESIGN.md),
    computed by the fused ``adm_pool`` and ``feature_mse`` ops.

    Args:
        student_head, teacher_head: each model's classifier (``W^s``, ``W^t``), applied to the
            attention-weighted global average pool of the last stage.
        alpha, beta, gamma: weights of L_co, L_di and L_feat.
        co, di: ``"ce"`` (Eq. 7-8) or ``"kd"`` (Eq. 11-12).
        student_channels, teacher_channels: per-stage channel counts; where they differ a
            1x1 conv + BN connector phi maps the student's stage to the teacher's for S and L_feat
            (the student still pools its own map).
        temperature: tau of the ``kd`` variants (paper: 1).
        eps: the attention denominators' epsilon (Algorithm 1: 1e-5).
        impl: backend of the fused ops (None: the compiled kernel of the tensors' device).

    ``forward(feats_s, feats_t, target, *, teacher_prev_probs=None, delta=None)``: the stage
    features of each model (before the final ReLU), the labels, and for ``di="kd"`` the teacher's
    previous-epoch probabilities for these samples and the current delta (``kd_delta``). Without
    ``teacher_prev_probs`` (the first epoch) the ``kd`` target is the one-hot label.
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
        # Heads are the models' own classifiers: referenced, not owned (no double registration).
        self._heads = (student_head, teacher_head)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.co, self.di = co, di
        self.temperature, self.eps, self.impl = temperature, eps, impl
        self.connectors = nn.ModuleList()
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("ADMLoss: give both student_channels and teacher_channels, or neither")
        if student_channels is not None:
            if len(student_channels) != len(teacher_channels):
                raise ValueError(
                    f"ADMLoss: student_channels {list(student_channels)} and teacher_channels "
                    f"{list(teacher_channels)} must list the same number of stages"
                )
            for cs, ct in zip(student_channels, teacher_channels):
                self.connectors.append(_connector(cs, ct) if cs != ct else nn.Identity())

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
        if target.dim() != 1 or target.shape[0] != feats_s[0].shape[0]:
            raise ValueError(
                f"ADMLoss: target must be [B] = [{feats_s[0].shape[0]}], got {tuple(target.shape)}"
            )

    def feat_loss(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
        """``L_feat = sum_{i=1}^{N-1} mse(phi(F_s[i]), F_t[i].detach()) / 2^(N-i)`` (stage 0 skipped,
        as Algorithm 1). Where spatial sizes differ the larger map is area-pooled to the smaller."""
        n = len(feats_s)
        loss = feats_s[0].new_zeros(())
        for i in range(1, n):
            fs, ft = self._mapped(i, feats_s[i]), feats_t[i].detach()
            size = min(fs.shape[-2:], ft.shape[-2:], key=lambda hw: hw[0] * hw[1])
            fs, ft = _to_size(fs, size), _to_size(ft, size)
            loss = loss + ops.feature_mse(fs, ft.to(fs.dtype), impl=self.impl) / 2 ** (n - i)
        return loss

    def pooled(self, feat_s: torch.Tensor, feat_t: torch.Tensor):
        """``(pooled_s, pooled_t, attn_co_s, attn_co_t)``: the consensus-weighted student pool, the
        divergence-weighted teacher pool, and the consensus map at each model's resolution."""
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

    def adm_loss(
        self,
        feat_s: torch.Tensor,
        feat_t: torch.Tensor,
        target: torch.Tensor,
        teacher_prev_probs: Optional[torch.Tensor] = None,
        delta: Optional[float] = None,
    ) -> torch.Tensor:
        """``alpha * L_co + beta * L_di`` on the last stage (Eq. 7-9, or Eq. 11-12)."""
        student_head, teacher_head = self._heads
        pooled_s, pooled_t, _, attn_co_t = self.pooled(feat_s, feat_t)
        logits_s = student_head(pooled_s)
        logits_t = teacher_head(pooled_t)
        tau = self.temperature
        if self.co == "ce":
            loss_co = F.cross_entropy(logits_s, target)
        else:  # Eq. 11: the teacher's consensus-pooled prediction as a detached target
            with torch.no_grad():
                teacher_co = teacher_head(ops.weighted_pool_reference(feat_t, attn_co_t))
            loss_co = kd_kl(logits_s, soft_probs(teacher_co, tau), tau)
        if self.di == "ce":
            loss_di = F.cross_entropy(logits_t, target)
        else:  # Eq. 12: (1 - delta) * onehot + delta * p_t(previous epoch)
            onehot = F.one_hot(target, logits_t.shape[1]).to(logits_t.dtype)
            if teacher_prev_probs is None:
                soft_target = onehot
            else:
                if teacher_prev_probs.shape != logits_t.shape:
                    raise ValueError(
                        f"ADMLoss: teacher_prev_probs must be {tuple(logits_t.shape)}, got "
                        f"{tuple(teacher_prev_probs.shape)}"
                    )
                if delta is None:
                    raise ValueError("ADMLoss: di='kd' with teacher_prev_probs needs delta (see kd_delta)")
                soft_target = (1 - delta) * onehot + delta * teacher_prev_probs.to(logits_t.dtype)
            loss_di = kd_kl(logits_t, soft_target, tau)
        return self.alpha * loss_co + self.beta * loss_di

    def forward(
        self,
        feats_s: Sequence[torch.Tensor],
        feats_t: Sequence[torch.Tensor],
        target: torch.Tensor,
        *,
        teacher_prev_probs: Optional[torch.Tensor] = None,
        delta: Optional[float] = None,
    ) -> torch.Tensor:
        self._check(feats_s, feats_t, target)
        loss = self.adm_loss(feats_s[-1], feats_t[-1], target, teacher_prev_probs, delta)
        if self.gamma != 0.0:  # Algorithm 1 multiplies by gamma; skipping 0 * L_feat saves a pass
            loss = loss + self.gamma * self.feat_loss(feats_s, feats_t)
        return loss
