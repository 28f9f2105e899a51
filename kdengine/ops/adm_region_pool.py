"""adm_region_pool: ADM's attention-weighted pooling over class regions, for dense prediction.

    pooled[b, k] = sum over the pixels p of class k of attn[b, p] * relu(feat[b, :, p]) / count[b, k]
    count[b, k]  = number of pixels of class k in image b      (pooled[b, k] = 0 where it is 0)

A pixel belongs to class k when its label is k, ``0 <= k < num_classes`` and ``k !=
ignore_index``; other labels (the ignore index, or values outside the classes) are pooled
nowhere, in every backend alike. With one label covering an image this is ADM's global pooling
(:func:`kdengine.ops.adm_pool`'s ``mean_hw(attn * relu(feat))``).

Gradients flow into ``feat`` only, ``attn`` is a constant (ADM's maps are detached):
``d feat[b, c, p] = grad_pooled[b, k, c] / count[b, k] * attn[b, p] * (feat[b, c, p] > 0)`` at
the pixels of class k, 0 at pixels pooled nowhere. The fused kernels read ``feat`` once forward
and once backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import FLOATING, compiled_op_registered, define_triton_op, resolve_impl

_OP = "adm_region_pool"


def pooled_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Which pixels are pooled: ``0 <= label < num_classes`` and ``label != ignore_index``."""
    return (labels >= 0) & (labels < num_classes) & (labels != ignore_index)


def check_region_inputs(feat, attn, labels, num_classes) -> torch.Tensor:
    """Refuse, naming the argument, what the kernels cannot take; return the labels as int64.

    Args:
        feat: ``[B, C, H, W]`` floating feature.
        attn: ``[B, H, W]`` floating map on its device.
        labels: ``[B, H, W]`` integer map on its device.
        num_classes: at least 1.

    Returns:
        ``labels`` as int64 (a copy only for other integer dtypes).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a wrong dtype, shape, device or ``num_classes``.
    """
    for name, x in (("feat", feat), ("attn", attn), ("labels", labels)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("feat", feat), ("attn", attn)):
        if x.dtype not in FLOATING:
            raise ValueError(f"{_OP}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if feat.dim() != 4:
        raise ValueError(f"{_OP}: feat must be [B, C, H, W], got shape {tuple(feat.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{_OP}: labels must be an integer tensor (class ids), got {labels.dtype}")
    B, _, H, W = feat.shape
    for name, x in (("attn", attn), ("labels", labels)):
        if tuple(x.shape) != (B, H, W):
            raise ValueError(
                f"{_OP}: {name} must be [B, H, W] = {[B, H, W]} to match the feature {tuple(feat.shape)}, "
                f"got {tuple(x.shape)}"
            )
        if x.device != feat.device:
            raise ValueError(f"{_OP}: {name} is on {x.device} but the feature is on {feat.device}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{_OP}: num_classes must be an integer >= 1, got {num_classes!r}")
    return labels.long()


def adm_region_pool_reference(feat: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor, num_classes: int,
                              ignore_index: int = 255):
    """Pure-PyTorch oracle of :func:`adm_region_pool`: a one-hot matrix product.

    Returns:
        ``(pooled [B, K, C]`` in ``feat``'s dtype, differentiable in ``feat``; ``count [B, K]``
        int64).
    """
    B, C, H, W = feat.shape
    labels = labels.reshape(B, H * W).long()
    pooled_mask = pooled_labels(labels, num_classes, ignore_index)
    onehot = F.one_hot(torch.where(pooled_mask, labels, 0), num_classes) * pooled_mask.unsqueeze(-1)  # [B, HW, K]
    count = onehot.sum(dim=1)
    weighted = attn.detach().reshape(B, 1, H * W).to(feat.dtype) * F.relu(feat).reshape(B, C, H * W)
    sums = torch.bmm(onehot.transpose(1, 2).to(feat.dtype), weighted.transpose(1, 2))  # [B, K, C]
    return sums / count.clamp_min(1).unsqueeze(-1).to(feat.dtype), count


def adm_region_pool(
    feat: torch.Tensor,
    attn: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    *,
    impl: Optional[str] = None,
):
    """Attention-weighted mean of ``relu(feat)`` over each class's pixels, per image.

    Args:
        feat: ``[B, C, H, W]`` feature (fp32/fp16/bf16/fp64); contiguous or channels_last is
            read without a copy.
        attn: ``[B, H, W]`` weights (e.g. :func:`kdengine.ops.adm_maps`' maps), any floating
            dtype; no gradient flows into it.
        labels: ``[B, H, W]`` integer class ids on the feature grid (e.g. the label map
            nearest-downsampled to it).
        num_classes: K, the classes pooled (labels ``0 .. K-1``).
        ignore_index: a label pooled nowhere (Cityscapes: 255).
        impl: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None (the compiled kernel
            of the tensors' device, else the reference).

    Returns:
        ``(pooled, count)``: ``pooled [B, K, C]`` in ``feat``'s dtype (0 for classes absent from
        an image), differentiable with respect to ``feat``; ``count [B, K]`` int64, the pixels of
        each class.
    """
    labels = check_region_inputs(feat, attn, labels, num_classes)
    impl = resolve_impl(_OP, impl, feat)
    if impl == "reference":
        return adm_region_pool_reference(feat, attn, labels, num_classes, ignore_index)
    op = torch.ops.kdengine.adm_region_pool_triton if impl == "triton" else torch.ops.kdengine.adm_region_pool
    return op(feat, attn, labels, num_classes, ignore_index)


# ---------------------------------------------------------------- torch.library registration


def _register(forward_name: str, backward_name: str) -> None:
    backward_op = getattr(torch.ops.kdengine, backward_name)

    @torch.library.register_fake(f"kdengine::{forward_name}")
    def _(feat, attn, labels, num_classes, ignore_index=255):
        B, C = feat.shape[:2]
        return feat.new_empty((B, num_classes, C)), feat.new_empty((B, num_classes), dtype=torch.int64)

    @torch.library.register_fake(f"kdengine::{backward_name}")
    def _(grad_pooled, feat, attn, labels, count, ignore_index):
        return torch.empty_like(feat)

    def setup_context(ctx, inputs, output):
        feat, attn, labels, _num_classes, ignore_index = inputs
        _, count = output
        ctx.save_for_backward(feat, attn, labels, count)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(count)

    def backward(ctx, grad_pooled, _grad_count):
        feat, attn, labels, count = ctx.saved_tensors
        grad_feat = None
        if ctx.needs_input_grad[0] and grad_pooled is not None:
            grad_feat = backward_op(grad_pooled, feat, attn, labels, count, ctx.ignore_index)
        return grad_feat, None, None, None, None

    torch.library.register_autograd(f"kdengine::{forward_name}", backward, setup_context=setup_context)


def _triton_forward(feat, attn, labels, num_classes, ignore_index=255):
    from .triton import adm_region_pool as kernels

    return kernels.region_pool_forward(feat, attn, labels, num_classes, ignore_index)


def _triton_backward(grad_pooled, feat, attn, labels, count, ignore_index):
    from .triton import adm_region_pool as kernels

    return kernels.region_pool_backward(grad_pooled, feat, attn, labels, count, ignore_index)


if compiled_op_registered(_OP):
    _register(_OP, "_adm_region_pool_backward")

if _extension.HAS_TRITON:
    define_triton_op(
        "adm_region_pool_triton",
        "(Tensor feat, Tensor attn, Tensor labels, int num_classes, int ignore_index=255) -> (Tensor, Tensor)",
        _triton_forward,
    )
    define_triton_op(
        "_adm_region_pool_backward_triton",
        "(Tensor grad_pooled, Tensor feat, Tensor attn, Tensor labels, Tensor count, int ignore_index) -> Tensor",
        _triton_backward,
    )
    _register("adm_region_pool_triton", "_adm_region_pool_backward_triton")
