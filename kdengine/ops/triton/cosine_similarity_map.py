"""Triton kernels of cosine_similarity_map (see kdengine/ops/cosine_similarity_map.py).

Forward: one program per (pixel block, image) loops over channel blocks accumulating
<s, t>, |s|^2 and |t|^2 per pixel, then writes S and the two norms (the backward needs them).
Backward: one elementwise pass over [channel block, pixel block] tiles. With a = max(|s|, eps),
c = max(|t|, eps) and g the incoming gradient of S,
    grad_s = g / (a c) * t - [|s| > eps] g S / a^2 * s,   grad_t symmetrically.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import check_feature_pair, opmath_dtype
from ._common import (
    acc_type,
    check_device,
    check_pixel_map,
    cosine_from_norms,
    dense_feature,
    feature_offsets,
    in_layout,
    launch_guard,
    pixel_channel_sums,
    pixel_map,
    pow2_block,
    precise_sqrt,
    to_output,
)


@triton.jit
def _cosine_forward_kernel(
    s_ptr, t_ptr, sim_ptr, norm_s_ptr, norm_t_ptr,
    C, HW,
    EPS: tl.constexpr, ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    s_img = s_ptr + b * C * HW
    t_img = t_ptr + b * C * HW
    dot, sq_s, sq_t = pixel_channel_sums(s_img, t_img, p, p_ok, C, HW, ACC, CHANNELS_LAST, BLOCK_C, BLOCK_P)
    norm_s = precise_sqrt(sq_s)
    norm_t = precise_sqrt(sq_t)
    sim = cosine_from_norms(dot, norm_s, norm_t, EPS)
    out = b * HW + p
    tl.store(sim_ptr + out, to_output(sim, sim_ptr), mask=p_ok)
    tl.store(norm_s_ptr + out, norm_s, mask=p_ok)
    tl.store(norm_t_ptr + out, norm_t, mask=p_ok)


@triton.jit
def _cosine_backward_kernel(
    s_ptr, t_ptr, g_ptr, sim_ptr, norm_s_ptr, norm_t_ptr, grad_s_ptr, grad_t_ptr,
    C, HW, n_cblocks, n_pblocks,
    g_stride_b, g_stride_p, sim_stride_b, sim_stride_p,
    ns_stride_b, ns_stride_p, nt_stride_b, nt_stride_p,
    EPS: tl.constexpr, ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    pb = pid % n_pblocks
    cb = (pid // n_pblocks) % n_cblocks
    b = (pid // (n_pblocks * n_cblocks)).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = c < C
    p_ok = p < HW

    # Per-pixel coefficients (recomputed by every channel block of the pixel block: cheap).
    g = tl.load(g_ptr + b * g_stride_b + p * g_stride_p, mask=p_ok, other=0.0).to(ACC)
    sim = tl.load(sim_ptr + b * sim_stride_b + p * sim_stride_p, mask=p_ok, other=0.0).to(ACC)
    norm_s = tl.load(norm_s_ptr + b * ns_stride_b + p * ns_stride_p, mask=p_ok, other=1.0)
    norm_t = tl.load(norm_t_ptr + b * nt_stride_b + p * nt_stride_p, mask=p_ok, other=1.0)
    norm_s = norm_s.to(ACC)
    norm_t = norm_t.to(ACC)
    eps = tl.full([], EPS, ACC)
    a = tl.maximum(norm_s, eps)
    cn = tl.maximum(norm_t, eps)
    k_cross = g / (a * cn)
    k_s = tl.where(norm_s > eps, g * sim / (a * a), 0.0)
    k_t = tl.where(norm_t > eps, g * sim / (cn * cn), 0.0)

    offs = b * C * HW + feature_offsets(c, p, C, HW, CHANNELS_LAST)
    mask = c_ok[:, None] & p_ok[None, :]
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)
    grad_s = k_cross[None, :] * t - k_s[None, :] * s
    grad_t = k_cross[None, :] * s - k_t[None, :] * t
    tl.store(grad_s_ptr + offs, to_output(grad_s, grad_s_ptr), mask=mask)
    tl.store(grad_t_ptr + offs, to_output(grad_t, grad_t_ptr), mask=mask)


def _tile(C: int, HW: int, channels_last: bool) -> tuple[int, int]:
    """[BLOCK_C, BLOCK_P] of 2048 elements at most, the longer side on the unit-stride axis."""
    block_c, block_p = (64, 32) if channels_last else (32, 64)
    return pow2_block(C, 16, block_c), pow2_block(HW, 16, block_p)


def cosine_similarity_map_forward(feat_s: torch.Tensor, feat_t: torch.Tensor, eps: float):
    """``(sim, norm_s, norm_t)``, each ``[B, H, W]``: S in the input dtype, the norms in the
    accumulation dtype (fp32, fp64 for fp64 input)."""
    check_feature_pair("cosine_similarity_map", feat_s, feat_t)
    check_device("cosine_similarity_map", feat_s)
    s, channels_last = dense_feature(feat_s)
    t = in_layout(feat_t, channels_last)
    B, C, H, W = s.shape
    HW = H * W
    acc = opmath_dtype(s.dtype)
    sim = s.new_empty((B, H, W))
    norm_s = s.new_empty((B, H, W), dtype=acc)
    norm_t = s.new_empty((B, H, W), dtype=acc)
    if sim.numel() == 0:
        return sim, norm_s, norm_t
    block_c, block_p = _tile(C, HW, channels_last)
    with launch_guard(s):
        _cosine_forward_kernel[(triton.cdiv(HW, block_p), B)](
            s, t, sim, norm_s, norm_t, C, HW,
            EPS=eps, ACC=acc_type(s.dtype), CHANNELS_LAST=channels_last,
            BLOCK_C=block_c, BLOCK_P=block_p,
        )
    return sim, norm_s, norm_t


def cosine_similarity_map_backward(
    grad: torch.Tensor,
    feat_s: torch.Tensor,
    feat_t: torch.Tensor,
    sim: torch.Tensor,
    norm_s: torch.Tensor,
    norm_t: torch.Tensor,
    eps: float,
):
    """``(grad_s, grad_t)``, each in the layout the forward read ``feat_s`` in."""
    op = "_cosine_similarity_map_backward"
    check_feature_pair(op, feat_s, feat_t)
    for name, m in (("grad", grad), ("sim", sim), ("norm_s", norm_s), ("norm_t", norm_t)):
        check_pixel_map(op, name, m, feat_s)
    check_device(op, feat_s)
    s, channels_last = dense_feature(feat_s)
    t = in_layout(feat_t, channels_last)
    grad_s = torch.empty_like(s)  # same strides as s and t, so one set of offsets serves all
    grad_t = torch.empty_like(t)
    if s.numel() == 0:
        return grad_s, grad_t
    B, C, H, W = s.shape
    HW = H * W
    maps = [pixel_map(m) for m in (grad, sim, norm_s, norm_t)]
    block_c, block_p = _tile(C, HW, channels_last)
    n_cblocks, n_pblocks = triton.cdiv(C, block_c), triton.cdiv(HW, block_p)
    with launch_guard(s):
        _cosine_backward_kernel[(B * n_cblocks * n_pblocks,)](
            s, t, *(m for m, _, _ in maps), grad_s, grad_t, C, HW, n_cblocks, n_pblocks,
            *(stride for _, stride_b, stride_p in maps for stride in (stride_b, stride_p)),
            EPS=eps, ACC=acc_type(s.dtype), CHANNELS_LAST=channels_last,
            BLOCK_C=block_c, BLOCK_P=block_p,
        )
    return grad_s, grad_t
