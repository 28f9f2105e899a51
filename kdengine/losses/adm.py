"""ADM: Asymmetric Decision-Making (ICML 2025), paper Eq. 5-12 and Algorithm 1.

:class:`ADMLoss` is the paper's (classification); :class:`DenseADMLoss` its dense form for
semantic segmentation (the paper's Sec. 5.3 gives no formula: the decisions are in its
docstring). Both compute L_feat with :func:`stage_feature_loss`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..models.base import KDModel
from .kl import kd_kl, soft_probs
from .segmentation import IGNORE_INDEX, labels_at

VARIANTS = ("ce", "kd")
#: Dense ADM's two forms of L_co / L_di (:class:`DenseADMLoss`).
DENSE_FORMS = ("region", "pixel")


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


def stage_feature_loss(
    feats_s: Sequence[torch.Tensor],
    feats_t: Sequence[torch.Tensor],
    connectors: Optional[Sequence[nn.Module]] = None,
    *,
    impl: Optional[str] = None,
    weight: Optional[float] = None,
) -> torch.Tensor:
    """ADM's L_feat: ``sum_{i=1}^{N-1} mse(phi_i(F_s[i]), F_t[i].detach()) / 2^(N-i)`` (Eq. 5;
    stage 0 skipped, as Algorithm 1), by the fused ``feature_mse`` op. Where spatial sizes differ
    the larger map is area-pooled to the smaller. Classification's :class:`ADMLoss` and the dense
    :class:`DenseADMLoss` both call this.

    Args:
        feats_s, feats_t: the N stage features of each model, ``[B, C_i, H_i, W_i]``.
        connectors: one module per stage (``nn.Identity`` where the channels agree), or None /
            empty for none.
        impl: the ``feature_mse`` backend (None: the compiled kernel of the tensors' device).
        weight: the factor the caller multiplies this loss by before summing it into the loss it
            calls ``backward()`` on (ADM's gamma), or None. It is passed on to ``feature_mse`` as
            ``grad_weight = weight / 2^(N-i)``, so the CPU kernel writes each stage's gradient in
            its forward pass; it does not change the value.

    Returns:
        The 0-d loss; only the student side (and the connectors) receives a gradient.
    """
    n = len(feats_s)
    loss = feats_s[0].new_zeros(())
    for i in range(1, n):
        fs = connectors[i](feats_s[i]) if connectors is not None and len(connectors) else feats_s[i]
        ft = feats_t[i].detach()
        size = min(fs.shape[-2:], ft.shape[-2:], key=lambda hw: hw[0] * hw[1])
        fs, ft = _to_size(fs, size), _to_size(ft, size)
        scale = 2 ** (n - i)
        hint = weight / scale if weight else None
        loss = loss + ops.feature_mse(fs, ft.to(fs.dtype), impl=impl, grad_weight=hint) / scale
    return loss


def _check_head(arg: str, head, channels: Optional[Sequence[int]], owner: str = "ADMLoss") -> None:
    """Reject what cannot be a classifier head before it fails deep inside a forward pass."""
    # A whole zoo model where its head is meant would get a [B, C] pool as an image and fail in
    # conv2d; calling it to find out would run its BNs in train mode, so check the type instead.
    if isinstance(head, KDModel):
        raise ValueError(
            f"{owner}: {arg} must be the model's classifier head (e.g. model.head), mapping the "
            f"[B, C_last] pool to logits, got the whole model {type(head).__name__}"
        )
    if not callable(head):
        raise ValueError(f"{owner}: {arg} must be a module mapping [B, C_last] to logits, got {type(head).__name__}")
    if channels is not None and isinstance(head, nn.Linear) and head.in_features != int(channels[-1]):
        raise ValueError(
            f"ADMLoss: {arg} takes {head.in_features} features, but the last stage has {int(channels[-1])} "
            "channels (the head is applied to that stage's pool)"
        )


def _check_stages(owner: str, feats_s, feats_t, connectors: nn.ModuleList) -> None:
    """Refuse stage lists that cannot be paired (``owner`` names the loss in the messages)."""
    if len(feats_s) != len(feats_t) or len(feats_s) == 0:
        raise ValueError(
            f"{owner}: feats_s and feats_t must list the same stages, got {len(feats_s)} "
            f"and {len(feats_t)}"
        )
    if len(connectors) and len(connectors) != len(feats_s):
        raise ValueError(
            f"{owner}: built for {len(connectors)} stages, got {len(feats_s)} features"
        )
    for i, (fs, ft) in enumerate(zip(feats_s, feats_t)):
        if fs.dim() != 4 or ft.dim() != 4 or fs.shape[0] != ft.shape[0]:
            raise ValueError(
                f"{owner}: stage {i} features must be [B, C, H, W] with one B, got feats_s "
                f"{tuple(fs.shape)} and feats_t {tuple(ft.shape)}"
            )
        if fs.shape[1] != ft.shape[1] and not len(connectors):
            raise ValueError(
                f"{owner}: stage {i} channels differ (feats_s {tuple(fs.shape)}, feats_t "
                f"{tuple(ft.shape)}); pass student_channels and teacher_channels to add connectors"
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
        _check_stages("ADMLoss", feats_s, feats_t, self.connectors)
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
        """L_feat (Eq. 5) with this loss's connectors: :func:`stage_feature_loss`.

        Args:
            feats_s, feats_t: the N stage features of each model (checked by ``parts``).

        Returns:
            The 0-d loss; only the student side (and phi) receives a gradient.
        """
        return stage_feature_loss(feats_s, feats_t, self.connectors, impl=self.impl, weight=self.gamma)

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


# --------------------------------------------------------------------------- dense prediction


def region_ce(
    head: nn.Module,
    feat: torch.Tensor,
    attn: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    *,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Dense ADM's region form of one model's term: per image and per class present, the
    ``attn``-weighted mean of ``relu(feat)`` over that class's pixels (``adm_region_pool``),
    classified by ``head``, cross-entropy against that class; averaged over the (image, class)
    pairs with at least one pixel.

    Absent classes pool to 0 and enter with weight 0 (masks and weighted sums: no host sync, no
    data-dependent shape, so a CUDA graph can capture it); with none present at all the loss is 0.

    Args:
        head: the model's classifier, mapping ``[..., C]`` to ``[..., K]``.
        feat: ``[B, C, h, w]`` the head feature.
        attn: ``[B, h, w]`` ADM's map (A_co for the student, A_di for the teacher), detached.
        labels: ``[B, h, w]`` the label map at the feature grid.
        num_classes: K.
        ignore_index: the label pooled nowhere.
        impl: the ``adm_region_pool`` backend.

    Returns:
        The 0-d loss, differentiable in ``feat`` and ``head``.
    """
    pooled, count = ops.adm_region_pool(feat, attn, labels, num_classes, ignore_index, impl=impl)
    logits = head(pooled)  # [B, K, K]: row k classifies class k's pool
    # at least fp32 (autocast leaves log_softmax in bf16 on CPU), as cross_entropy would be
    log_p = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    nll = -torch.diagonal(log_p, dim1=-2, dim2=-1)  # [B, K]: each row's CE against its own class
    present = (count > 0).to(nll.dtype)
    return (nll * present).sum() / present.sum().clamp_min(1)


def pixel_ce(logits: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor,
             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Dense ADM's pixel form of one model's term: the per-pixel cross-entropy of the model's own
    logits at the feature grid, weighted by ``attn`` renormalised over the valid pixels:
    ``sum_p v_p A_p CE_p / sum_p v_p A_p`` over the batch's pixels (``v``: label not ignored).

    With ``A = 1`` this is the ordinary cross-entropy over the labelled pixels of the grid; ADM's
    maps have a mean of ~1 over each image's valid pixels, so they reweight that CE towards the
    consensus (student) or divergence (teacher) pixels. 0 when no pixel is valid.

    Args:
        logits: ``[B, K, h, w]``.
        attn: ``[B, h, w]``, detached.
        labels: ``[B, h, w]`` int64 at the same grid.
        ignore_index: the label that counts nowhere.

    Returns:
        The 0-d loss, differentiable in ``logits``.
    """
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    weight = attn.to(ce.dtype) * (labels != ignore_index).to(ce.dtype)
    return (weight * ce).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)


def _head_inputs(head) -> Optional[int]:
    """The channels a classifier takes (a 1x1 conv's ``in_channels``, a linear layer's
    ``in_features``), or None when it does not say."""
    for attr in ("in_channels", "in_features"):
        value = getattr(head, attr, None)
        if isinstance(value, int):
            return value
    return None


class DenseADMLoss(nn.Module):
    """ADM for semantic segmentation: ``alpha * L_co + beta * L_di + gamma * L_feat`` on
    :class:`~kdengine.models.segmentation.SegOutput` s (Eq. 7-8 with the global pool replaced by
    region pooling).

    - **S and the maps**: ``S = cos(phi(F_s), F_t)`` over the channels of the **head features**
      (the classifier's input, at the feature grid ``h, w``); ``phi`` a 1x1 conv + BN connector
      where the head channels differ (PSPNet R18/R101: 128/256; DeepLabV3: 512 both, none).
      ``A_co, A_di = adm_maps(phi(F_s), F_t, valid)``: the means of Eq. 7-8 run over the valid
      pixels, those whose label (nearest-downsampled to the grid) is not ``ignore_index``. S is
      detached, as in ADM, so ``phi`` gets no gradient from anything (L_feat is on the backbone
      stages): it is a fixed random projection (with BN statistics), its parameters frozen
      (``requires_grad`` False) and kept in the state dict so that a resumed run sees the same one.
      In train mode its BN statistics include every pixel, ignored ones too.
    - **Region form** (``dense="region"``, default, the faithful one): per image and per class
      present at the grid, pool ``A_co * relu(F_s)`` over that class's pixels (``adm_region_pool``)
      and classify the pool with the student's own classifier; CE against that class; averaged
      over the (image, class) pairs present (:func:`region_ce`). The teacher's L_di the same with
      ``A_di * relu(F_t)`` and its classifier. With one label covering an image (nothing ignored)
      this is exactly Algorithm 1's pooled CE.
    - **Pixel form** (``dense="pixel"``): the per-pixel CE of each model's own logits at the grid
      weighted by its map renormalised over the valid pixels (:func:`pixel_ce`).
    - **L_feat** (Eq. 5): :func:`stage_feature_loss` over the backbone's stage features (stage 0
      skipped, weights ``1/2^(N-i)``, teacher detached, connectors where channels differ), the
      same code as classification's; it runs over every pixel (ignored ones included: the
      features do not depend on the labels).
    - Only Eq. 7-8's ``"ce"`` variants: Eq. 11-12's ``"kd"`` ones would need per-pixel
      previous-epoch teacher maps for the whole training set.

    Ignored pixels change nothing in L_co and L_di: they are pooled nowhere, left out of the
    maps' means, and weighted 0 by the pixel form (up to the BN statistics of ``phi`` above).

    Args:
        student_head, teacher_head: the models' 1x1 classifiers (``model.head``), which map
            ``[..., C]`` vectors to ``[..., K]`` too. Referenced, not owned.
        alpha, beta, gamma: weights of L_co, L_di and L_feat.
        num_classes: K (the pooled classes ``0 .. K-1``).
        dense: ``"region"`` or ``"pixel"``.
        ignore_index: the label that counts nowhere (Cityscapes: 255).
        student_channels, teacher_channels: per-stage channel counts of the backbones (both or
            neither); connectors where they differ, for L_feat (stages 1 .. N-1 when ``gamma != 0``).
        student_head_channels, teacher_head_channels: the head features' channels (both or
            neither); a connector where they differ.
        eps: the maps' denominators' epsilon (Algorithm 1: 1e-5).
        impl: backend of the fused ops (None: the compiled kernel of the tensors' device).

    Raises:
        ValueError: an unknown ``dense``, a bad ``num_classes``, only one of a channel pair,
            stage lists of different lengths, or a head that is a whole model or takes other
            channels than its head feature's.
    """

    def __init__(
        self,
        student_head: nn.Module,
        teacher_head: nn.Module,
        alpha: float,
        beta: float,
        gamma: float,
        *,
        num_classes: int,
        dense: str = "region",
        ignore_index: int = IGNORE_INDEX,
        student_channels: Optional[Sequence[int]] = None,
        teacher_channels: Optional[Sequence[int]] = None,
        student_head_channels: Optional[int] = None,
        teacher_head_channels: Optional[int] = None,
        eps: float = 1e-5,
        impl: Optional[str] = None,
    ):
        super().__init__()
        name = "DenseADMLoss"
        if dense not in DENSE_FORMS:
            raise ValueError(f"{name}: dense must be one of {DENSE_FORMS}, got {dense!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"{name}: num_classes must be an integer >= 1, got {num_classes!r}")
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError(f"{name}: give both student_channels and teacher_channels, or neither")
        if student_channels is not None and len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"{name}: student_channels {list(student_channels)} and teacher_channels "
                f"{list(teacher_channels)} must list the same number of stages"
            )
        if (student_head_channels is None) != (teacher_head_channels is None):
            raise ValueError(f"{name}: give both student_head_channels and teacher_head_channels, or neither")
        for arg, head, channels in (("student_head", student_head, student_head_channels),
                                    ("teacher_head", teacher_head, teacher_head_channels)):
            _check_head(arg, head, None, name)
            takes = _head_inputs(head)
            if channels is not None and takes is not None and takes != int(channels):
                raise ValueError(
                    f"{name}: {arg} takes {takes} channels, but the head feature has {int(channels)}"
                )
        self._heads = (student_head, teacher_head)  # the models' own: referenced, not owned
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.num_classes, self.dense, self.ignore_index = num_classes, dense, int(ignore_index)
        self.eps, self.impl = eps, impl
        self.connectors = nn.ModuleList()
        if student_channels is not None:
            for i, (cs, ct) in enumerate(zip(student_channels, teacher_channels)):
                used = i > 0 and self.gamma != 0.0
                self.connectors.append(_connector(cs, ct) if cs != ct and used else nn.Identity())
        differ = student_head_channels is not None and int(student_head_channels) != int(teacher_head_channels)
        self.head_connector = _connector(int(student_head_channels), int(teacher_head_channels)) if differ \
            else nn.Identity()
        self.head_connector.requires_grad_(False)  # S is detached: nothing trains it (docstring)

    def _check(self, out_s, out_t, labels: torch.Tensor) -> None:
        name = "DenseADMLoss"
        hs, ht = out_s.head_feature, out_t.head_feature
        if hs.dim() != 4 or ht.dim() != 4 or hs.shape[0] != ht.shape[0] or hs.shape[-2:] != ht.shape[-2:]:
            raise ValueError(
                f"{name}: the head features must be [B, C, h, w] with one B, h, w, got student "
                f"{tuple(hs.shape)} and teacher {tuple(ht.shape)}"
            )
        if hs.shape[1] != ht.shape[1] and isinstance(self.head_connector, nn.Identity):
            raise ValueError(
                f"{name}: the head features' channels differ (student {tuple(hs.shape)}, teacher "
                f"{tuple(ht.shape)}); pass student_head_channels and teacher_head_channels to add a connector"
            )
        b, _, h, w = hs.shape
        if labels.dim() != 3 or labels.shape[0] != b or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"{name}: labels must be an integer label map [B, H, W] with B = {b}, got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
        if self.dense == "pixel":
            for who, out in (("student", out_s), ("teacher", out_t)):
                if tuple(out.logits.shape) != (b, self.num_classes, h, w):
                    raise ValueError(
                        f"{name}: dense='pixel' needs the {who}'s logits at the head feature's grid "
                        f"[B, K, h, w] = {[b, self.num_classes, h, w]}, got {tuple(out.logits.shape)}"
                    )
        if self.gamma != 0.0:
            _check_stages(name, out_s.features, out_t.features, self.connectors)

    def maps(self, head_s: torch.Tensor, head_t: torch.Tensor, labels: torch.Tensor):
        """ADM's maps of a pair of head features.

        Args:
            head_s, head_t: ``[B, C, h, w]`` the head features.
            labels: ``[B, h, w]`` at their grid.

        Returns:
            ``(attn_co, attn_di)``, each ``[B, h, w]`` fp32 (fp64 for fp64 input), no gradient.
        """
        with torch.no_grad():  # S is a constant of the loss
            mapped = self.head_connector(head_s)
            return ops.adm_maps(mapped, head_t.to(mapped.dtype), labels != self.ignore_index,
                                eps=self.eps, impl=self.impl)

    def _term(self, head: nn.Module, out, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.dense == "region":
            return region_ce(head, out.head_feature, attn, labels, self.num_classes, self.ignore_index,
                             impl=self.impl)
        return pixel_ce(out.logits, attn, labels, self.ignore_index)

    def parts(self, out_s, out_t, labels: torch.Tensor):
        """Dense ADM's three terms, unweighted: ``(L_co, L_di, L_feat)``.

        A term whose weight is 0 is not computed and is None.

        Args:
            out_s, out_t: the student's and the teacher's ``SegOutput`` (``logits [B, K, h, w]``,
                ``head_feature [B, C, h, w]``, ``features``: the backbone's stages).
            labels: int64 ``[B, H, W]`` at the image's resolution (``ignore_index`` for
                unlabelled pixels); nearest-downsampled to the feature grid here.

        Returns:
            ``(co, di, feat)``, each a 0-d tensor or None: ``co`` differentiable in the student
            (head feature and classifier, or logits), ``di`` in the teacher, ``feat`` in the
            student's stages and the connectors.

        Raises:
            ValueError: outputs or labels of the wrong shape.
        """
        self._check(out_s, out_t, labels)
        student_head, teacher_head = self._heads
        loss_co = loss_di = loss_feat = None
        if self.alpha != 0.0 or self.beta != 0.0:
            grid = labels_at(labels, out_s.head_feature.shape[-2:])
            attn_co, attn_di = self.maps(out_s.head_feature, out_t.head_feature, grid)
            if self.alpha != 0.0:
                loss_co = self._term(student_head, out_s, attn_co, grid)
            if self.beta != 0.0:
                loss_di = self._term(teacher_head, out_t, attn_di, grid)
        if self.gamma != 0.0:
            loss_feat = stage_feature_loss(out_s.features, out_t.features, self.connectors, impl=self.impl,
                                           weight=self.gamma)
        return loss_co, loss_di, loss_feat

    def forward(self, out_s, out_t, labels: torch.Tensor) -> torch.Tensor:
        """``alpha * L_co + beta * L_di + gamma * L_feat`` (see ``parts`` for the arguments).

        Returns:
            The 0-d loss (zero when every weight is 0).
        """
        weighted = [w * part for w, part in zip((self.alpha, self.beta, self.gamma), self.parts(out_s, out_t, labels))
                    if part is not None]
        if not weighted:
            return out_s.head_feature.new_zeros(())
        loss = weighted[0]
        for term in weighted[1:]:
            loss = loss + term
        return loss
