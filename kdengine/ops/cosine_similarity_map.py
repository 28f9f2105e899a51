"""cosine_similarity_map: per-pixel cosine similarity of two feature maps (paper Eq. 6).

``S[b,h,w] = <s, t> / (max(|s|, eps) * max(|t|, eps))`` over channels, as
``F.cosine_similarity(feat_s, feat_t, dim=1, eps=1e-8)``; differentiable in both inputs (ADM
itself detaches S; this op serves analysis and visualisation).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import (
    COS_EPS,
    check_feature_pair,
    compiled_op_registered,
    define_triton_op,
    opmath_dtype,
    resolve_impl,
)


def cosine_similarity_map_reference(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch oracle."""
    return F.cosine_similarity(feat_s, feat_t, dim=1, eps=COS_EPS)


def cosine_similarity_map(
    feat_s: torch.Tensor, feat_t: torch.Tensor, *, impl: Optional[str] = None
) -> torch.Tensor:
    """Cosine similarity over channels of two feature maps, per pixel.

    Args:
        feat_s, feat_t: ``[B, C, H, W]`` features of the same shape, dtype (fp32/fp16/bf16/fp64)
            and device; contiguous or channels_last are read without a copy.
        impl: as for :func:`kdengine.ops.adm_pool`.

    Returns:
        ``S [B, H, W]`` in the input dtype (fp32 accumulation, fp64 for fp64), differentiable in
        both inputs.
    """
    check_feature_pair("cosine_similarity_map", feat_s, feat_t)
    impl = resolve_impl("cosine_similarity_map", impl, feat_s)
    if impl == "reference":
        return cosine_similarity_map_reference(feat_s, feat_t)
    op = (
        torch.ops.kdengine.cosine_similarity_map_triton
        if impl == "triton"
        else torch.ops.kdengine.cosine_similarity_map
    )
    return op(feat_s, feat_t, COS_EPS)[0]


# ---------------------------------------------------------------- torch.library registration


def _register(forward_name: str, backward_name: str) -> None:
    backward_op = getattr(torch.ops.kdengine, backward_name)

    @torch.library.register_fake(f"kdengine::{forward_name}")
    def _(feat_s, feat_t, eps=COS_EPS):
        B, _, H, W = feat_s.shape
        acc = opmath_dtype(feat_s.dtype)
        return (
            feat_s.new_empty((B, H, W)),
            feat_s.new_empty((B, H, W), dtype=acc),
            feat_s.new_empty((B, H, W), dtype=acc),
        )

    @torch.library.register_fake(f"kdengine::{backward_name}")
    def _(grad, feat_s, feat_t, sim, norm_s, norm_t, eps):
        return torch.empty_like(feat_s), torch.empty_like(feat_t)

    def setup_context(ctx, inputs, output):
        feat_s, feat_t = inputs[:2]
        eps = inputs[2] if len(inputs) > 2 else COS_EPS
        sim, norm_s, norm_t = output
        ctx.save_for_backward(feat_s, feat_t, sim, norm_s, norm_t)
        ctx.eps = eps
        ctx.mark_non_differentiable(norm_s, norm_t)

    def backward(ctx, grad, _grad_ns, _grad_nt):
        feat_s, feat_t, sim, norm_s, norm_t = ctx.saved_tensors
        d_s, d_t = backward_op(grad, feat_s, feat_t, sim, norm_s, norm_t, ctx.eps)
        need_s, need_t = ctx.needs_input_grad[:2]
        return (d_s if need_s else None), (d_t if need_t else None), None

    torch.library.register_autograd(
        f"kdengine::{forward_name}", backward, setup_context=setup_context
    )


def _triton_forward(feat_s, feat_t, eps=COS_EPS):
    from .triton import cosine_similarity_map as kernels

    return kernels.cosine_similarity_map_forward(feat_s, feat_t, eps)


def _triton_backward(grad, feat_s, feat_t, sim, norm_s, norm_t, eps):
    from .triton import cosine_similarity_map as kernels

    return kernels.cosine_similarity_map_backward(grad, feat_s, feat_t, sim, norm_s, norm_t, eps)


if compiled_op_registered("cosine_similarity_map"):
    _register("cosine_similarity_map", "_cosine_similarity_map_backward")

if _extension.HAS_TRITON:
    define_triton_op(
        "cosine_similarity_map_triton",
        "(Tensor feat_s, Tensor feat_t, float eps=1e-08) -> (Tensor, Tensor, Tensor)",
        _triton_forward,
    )
    define_triton_op(
        "_cosine_similarity_map_backward_triton",
        "(Tensor grad, Tensor feat_s, Tensor feat_t, Tensor sim, "
        "Tensor norm_s, Tensor norm_t, float eps) -> (Tensor, Tensor)",
        _triton_backward,
    )
    _register("cosine_similarity_map_triton", "_cosine_similarity_map_backward_triton")
