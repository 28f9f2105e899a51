"""adm_pool: ADM's consensus/divergence attention and weighted pooling (paper Eq. 6-8).

    S        = cos(feat_s[b,:,h,w], feat_t[b,:,h,w])          no gradient
    A_co     = (1 + S) / (1 + mean_hw(S) + eps)               student
    A_di     = (1 - S) / (mean_hw(1 - S) + eps)               teacher
    pooled_s = mean_hw(A_co * relu(feat_s)),  pooled_t = mean_hw(A_di * relu(feat_t))

The fused kernels read each input once forward (the denominators are per-image constants, so the
pooling numerators accumulate while S is computed) and once backward.
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


def adm_attention_reference(feat_s: torch.Tensor, feat_t: torch.Tensor, eps: float = 1e-5):
    """Consensus and divergence maps ``(attn_co, attn_di)``, each ``[B, H, W]``, detached."""
    sim = F.cosine_similarity(feat_s, feat_t, dim=1, eps=COS_EPS).detach()
    attn_co = (1 + sim) / (1 + sim.mean(dim=(1, 2), keepdim=True) + eps)
    attn_di = (1 - sim) / ((1 - sim).mean(dim=(1, 2), keepdim=True) + eps)
    return attn_co, attn_di


def weighted_pool_reference(feat: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``mean_hw(attn * relu(feat))``: ``feat [B, C, H, W]``, ``attn [B, H, W]`` -> ``[B, C]``."""
    return (attn.unsqueeze(1).to(feat.dtype) * F.relu(feat)).mean(dim=(2, 3))


def adm_pool_reference(feat_s: torch.Tensor, feat_t: torch.Tensor, eps: float = 1e-5):
    """Pure-PyTorch oracle: Algorithm 1's ``adm_loss`` pooling with the [B, 1, H, W] maps."""
    attn_co, attn_di = adm_attention_reference(feat_s, feat_t, eps)
    return weighted_pool_reference(feat_s, attn_co), weighted_pool_reference(feat_t, attn_di)


def adm_pool(
    feat_s: torch.Tensor,
    feat_t: torch.Tensor,
    *,
    eps: float = 1e-5,
    impl: Optional[str] = None,
    return_attention: bool = False,
):
    """Fused ADM pooling of a student and a teacher feature map.

    Args:
        feat_s, feat_t: ``[B, C, H, W]`` features of the same shape, dtype (fp32/fp16/bf16/fp64)
            and device; contiguous or channels_last are read without a copy.
        eps: the attention denominators' epsilon (Algorithm 1: 1e-5).
        impl: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None (the compiled kernel
            of the tensors' device, else the reference).
        return_attention: also return ``attn_co, attn_di`` (``[B, H, W]``, fp32, no gradient).

    Returns:
        ``(pooled_s, pooled_t)``, each ``[B, C]`` in the input dtype, differentiable with respect
        to ``feat_s`` and ``feat_t`` respectively (S itself carries no gradient).
    """
    check_feature_pair("adm_pool", feat_s, feat_t)
    impl = resolve_impl("adm_pool", impl, feat_s)
    if impl == "reference":
        attn_co, attn_di = adm_attention_reference(feat_s, feat_t, eps)
        pooled = (weighted_pool_reference(feat_s, attn_co), weighted_pool_reference(feat_t, attn_di))
        return (*pooled, attn_co, attn_di) if return_attention else pooled
    op = torch.ops.kdengine.adm_pool_triton if impl == "triton" else torch.ops.kdengine.adm_pool
    pooled_s, pooled_t, attn_co, attn_di = op(feat_s, feat_t, eps)
    return (pooled_s, pooled_t, attn_co, attn_di) if return_attention else (pooled_s, pooled_t)


# ---------------------------------------------------------------- torch.library registration


def _register(forward_name: str, backward_name: str) -> None:
    backward_op = getattr(torch.ops.kdengine, backward_name)

    @torch.library.register_fake(f"kdengine::{forward_name}")
    def _(feat_s, feat_t, eps=1e-5):
        B, C, H, W = feat_s.shape
        acc = opmath_dtype(feat_s.dtype)
        return (
            feat_s.new_empty((B, C)),
            feat_s.new_empty((B, C)),
            feat_s.new_empty((B, H, W), dtype=acc),
            feat_s.new_empty((B, H, W), dtype=acc),
        )

    @torch.library.register_fake(f"kdengine::{backward_name}")
    def _(grad_pooled, feat, attn):
        return torch.empty_like(feat)

    def setup_context(ctx, inputs, output):
        feat_s, feat_t = inputs[:2]
        _, _, attn_co, attn_di = output
        ctx.save_for_backward(feat_s, feat_t, attn_co, attn_di)
        ctx.mark_non_differentiable(attn_co, attn_di)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs

    def backward(ctx, grad_s, grad_t, _grad_co, _grad_di):
        feat_s, feat_t, attn_co, attn_di = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        d_s = backward_op(grad_s, feat_s, attn_co) if need_s and grad_s is not None else None
        d_t = backward_op(grad_t, feat_t, attn_di) if need_t and grad_t is not None else None
        return d_s, d_t, None

    torch.library.register_autograd(
        f"kdengine::{forward_name}", backward, setup_context=setup_context
    )


def _triton_forward(feat_s, feat_t, eps=1e-5):
    from .triton import adm_pool as kernels

    return kernels.adm_pool_forward(feat_s, feat_t, eps)


def _triton_backward(grad_pooled, feat, attn):
    from .triton import adm_pool as kernels

    return kernels.adm_pool_backward(grad_pooled, feat, attn)


if compiled_op_registered("adm_pool"):
    _register("adm_pool", "_adm_pool_backward")

if _extension.HAS_TRITON:
    define_triton_op(
        "adm_pool_triton",
        "(Tensor feat_s, Tensor feat_t, float eps=1e-05) -> (Tensor, Tensor, Tensor, Tensor)",
        _triton_forward,
    )
    define_triton_op(
        "_adm_pool_backward_triton",
        "(Tensor grad_pooled, Tensor feat, Tensor attn) -> Tensor",
        _triton_backward,
    )
    _register("adm_pool_triton", "_adm_pool_backward_triton")
