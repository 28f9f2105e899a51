"""adm_maps: ADM's consensus/divergence attention maps for dense prediction (paper Eq. 7-8 with
the means over the valid pixels).

    S      = cos(feat_s[b,:,h,w], feat_t[b,:,h,w])                    no gradient
    m      = mean of S over the valid pixels of image b               (0 when it has none)
    A_co   = (1 + S) / (1 + m + eps)                                   student
    A_di   = (1 - S) / ((1 - m) + eps)                                 teacher

``1 - m`` is the mean of ``1 - S`` over the same pixels, so with every pixel valid these are the
maps of :func:`kdengine.ops.adm_pool` (Algorithm 1). The maps are detached, as in ADM: the op
has no gradient. The fused kernels read each input once.
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


def check_valid(op: str, valid, feat: torch.Tensor) -> None:
    """Refuse a ``valid`` map that is not None or a bool ``[B, H, W]`` on ``feat``'s device.

    Args:
        op: the op's name, for the message.
        valid: the map.
        feat: the ``[B, C, H, W]`` feature it belongs to.

    Raises:
        TypeError: not a tensor.
        ValueError: not bool, the wrong shape or another device.
    """
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"{op}: valid must be None or a torch.Tensor, got {type(valid).__name__}")
    B, _, H, W = feat.shape
    if valid.dtype != torch.bool:
        raise ValueError(f"{op}: valid must be a bool tensor, got {valid.dtype}")
    if tuple(valid.shape) != (B, H, W):
        raise ValueError(
            f"{op}: valid must be [B, H, W] = {[B, H, W]} to match the feature {tuple(feat.shape)}, "
            f"got {tuple(valid.shape)}"
        )
    if valid.device != feat.device:
        raise ValueError(f"{op}: valid is on {valid.device} but the feature is on {feat.device}")


def adm_maps_reference(feat_s: torch.Tensor, feat_t: torch.Tensor, valid: Optional[torch.Tensor] = None,
                       eps: float = 1e-5):
    """Pure-PyTorch oracle of :func:`adm_maps`: ``(attn_co, attn_di)``, each ``[B, H, W]`` in the
    accumulation dtype (fp32, fp64 for fp64 input), detached."""
    sim = F.cosine_similarity(feat_s, feat_t, dim=1, eps=COS_EPS).detach().to(opmath_dtype(feat_s.dtype))
    if valid is None:
        mean = sim.mean(dim=(1, 2), keepdim=True)
    else:
        weight = valid.to(sim.dtype)
        count = weight.sum(dim=(1, 2), keepdim=True)
        mean = (sim * weight).sum(dim=(1, 2), keepdim=True) / count.clamp_min(1)
    return (1 + sim) / (1 + mean + eps), (1 - sim) / ((1 - mean) + eps)


def adm_maps(
    feat_s: torch.Tensor,
    feat_t: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-5,
    impl: Optional[str] = None,
):
    """ADM's attention maps of a student and a teacher feature map, means over valid pixels.

    Args:
        feat_s, feat_t: ``[B, C, H, W]`` features of the same shape, dtype (fp32/fp16/bf16/fp64)
            and device; contiguous or channels_last are read without a copy.
        valid: bool ``[B, H, W]``: the pixels the means run over (segmentation: the pixels whose
            label is not ignored), or None for every pixel. An image without valid pixels gets
            the mean 0. Maps are computed at every pixel either way.
        eps: the denominators' epsilon (Algorithm 1: 1e-5).
        impl: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None (the compiled kernel
            of the tensors' device, else the reference).

    Returns:
        ``(attn_co, attn_di)``, each ``[B, H, W]`` in fp32 (fp64 for fp64 input), without
        gradient (the maps are constants of ADM's loss).
    """
    check_feature_pair("adm_maps", feat_s, feat_t)
    check_valid("adm_maps", valid, feat_s)
    impl = resolve_impl("adm_maps", impl, feat_s)
    if impl == "reference":
        return adm_maps_reference(feat_s, feat_t, valid, eps)
    op = torch.ops.kdengine.adm_maps_triton if impl == "triton" else torch.ops.kdengine.adm_maps
    return op(feat_s, feat_t, valid, eps)


# ---------------------------------------------------------------- torch.library registration


def _register(name: str) -> None:
    @torch.library.register_fake(f"kdengine::{name}")
    def _(feat_s, feat_t, valid=None, eps=1e-5):
        B, _, H, W = feat_s.shape
        acc = opmath_dtype(feat_s.dtype)
        return feat_s.new_empty((B, H, W), dtype=acc), feat_s.new_empty((B, H, W), dtype=acc)

    # The maps carry no gradient: registered so that autograd knows, rather than failing on a
    # backward through an op without a formula.
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)

    def backward(ctx, _grad_co, _grad_di):
        return None, None, None, None

    torch.library.register_autograd(f"kdengine::{name}", backward, setup_context=setup_context)


def _triton_forward(feat_s, feat_t, valid=None, eps=1e-5):
    from .triton import adm_maps as kernels

    return kernels.adm_maps_forward(feat_s, feat_t, valid, eps)


if compiled_op_registered("adm_maps"):
    _register("adm_maps")

if _extension.HAS_TRITON:
    define_triton_op(
        "adm_maps_triton",
        "(Tensor feat_s, Tensor feat_t, Tensor? valid=None, float eps=1e-05) -> (Tensor, Tensor)",
        _triton_forward,
    )
    _register("adm_maps_triton")
