"""Triton kernels of adm_pool (see kdengine/ops/adm_pool.py for the maths).

Forward, two launches, each input read once from memory:
  1. ``_adm_partials_kernel``, one program per (pixel block, image): the per-pixel cosine S from
     a loop over channel blocks, then the numerators sum_p (1 ± S) relu(x) of its pixels for
     every channel, written to ``partials[B, n_blocks, 2, C]``, and its sum of S. S is parked in
     ``attn_co`` until the per-image mean is known. When the whole channel vector fits in one
     tile (C <= 256) the tile loaded for S is reused for the numerators; otherwise the channel
     loop runs twice over the same [C, BLOCK_P] slab, the second time from cache.
  2. ``_adm_finalize_kernel``, a few programs per image: the mean of S, the denominators, the
     pooled outputs (sum of the partials over pixel blocks) and the two attention maps.
No atomics: the reductions run in a fixed order, so results are deterministic; no host syncs.
Backward is one elementwise pass: grad_x = grad_pooled[b, c] * attn[b, p] / HW * (x > 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import COS_EPS, check_feature_pair, opmath_dtype
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

_TILE = 4096  # elements of one input in a [BLOCK_C, BLOCK_P] tile of the forward kernel


@triton.jit
def _weighted_relu_sums(x, w):
    """sum_p w[p] * relu(x[c, p]) for each channel c of a [BLOCK_C, BLOCK_P] tile."""
    return tl.sum(tl.maximum(x, 0.0) * w[None, :], axis=1)


@triton.jit
def _adm_partials_kernel(
    s_ptr, t_ptr, sim_ptr, sim_part_ptr, part_ptr,
    C, HW, n_pblocks,
    EPS: tl.constexpr, ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    c_in_block = tl.arange(0, BLOCK_C)
    s_img = s_ptr + b * C * HW
    t_img = t_ptr + b * C * HW
    # partials[b, pb, 0, :] holds the student's numerators, partials[b, pb, 1, :] the teacher's.
    part_s = part_ptr + (b * n_pblocks + pb) * 2 * C
    part_t = part_s + C

    if ONE_TILE:
        c_ok = c_in_block < C
        offs = feature_offsets(c_in_block, p, C, HW, CHANNELS_LAST)
        mask = c_ok[:, None] & p_ok[None, :]
        s = tl.load(s_img + offs, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_img + offs, mask=mask, other=0.0).to(ACC)
        dot = tl.sum(s * t, axis=0)
        norm_s = precise_sqrt(tl.sum(s * s, axis=0))
        norm_t = precise_sqrt(tl.sum(t * t, axis=0))
        sim = tl.where(p_ok, cosine_from_norms(dot, norm_s, norm_t, EPS), 0.0)
        tl.store(part_s + c_in_block, _weighted_relu_sums(s, 1.0 + sim), mask=c_ok)
        tl.store(part_t + c_in_block, _weighted_relu_sums(t, 1.0 - sim), mask=c_ok)
    else:
        dot, sq_s, sq_t = pixel_channel_sums(s_img, t_img, p, p_ok, C, HW, ACC, CHANNELS_LAST, BLOCK_C, BLOCK_P)
        sim = cosine_from_norms(dot, precise_sqrt(sq_s), precise_sqrt(sq_t), EPS)
        sim = tl.where(p_ok, sim, 0.0)
        w_co = 1.0 + sim  # masked pixels load zeros, so their weight does not matter
        w_di = 1.0 - sim
        for c0 in range(0, C, BLOCK_C):
            c = c0 + c_in_block
            offs = feature_offsets(c, p, C, HW, CHANNELS_LAST)
            mask = (c < C)[:, None] & p_ok[None, :]
            s = tl.load(s_img + offs, mask=mask, other=0.0).to(ACC)
            t = tl.load(t_img + offs, mask=mask, other=0.0).to(ACC)
            tl.store(part_s + c, _weighted_relu_sums(s, w_co), mask=c < C)
            tl.store(part_t + c, _weighted_relu_sums(t, w_di), mask=c < C)

    tl.store(sim_ptr + b * HW + p, sim, mask=p_ok)
    tl.store(sim_part_ptr + b * n_pblocks + pb, tl.sum(sim, axis=0))


@triton.jit
def _adm_finalize_kernel(
    sim_part_ptr, part_ptr, pooled_s_ptr, pooled_t_ptr, attn_co_ptr, attn_di_ptr,
    C, HW, n_pblocks,
    EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program j of image b: the pooled outputs of channel block j and the attention maps of
    pixel block j (either may be past the end, then it is all masked)."""
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_range = tl.arange(0, BLOCK_N)

    # Every program of the image sums the (few) per-block sums of S itself, in the same order.
    sim_acc = tl.zeros([BLOCK_N], ACC)
    for k0 in range(0, n_pblocks, BLOCK_N):
        k = k0 + n_range
        sim_acc += tl.load(sim_part_ptr + b * n_pblocks + k, mask=k < n_pblocks, other=0.0)
    mean_sim = tl.sum(sim_acc, axis=0) / HW
    eps = tl.full([], EPS, ACC)  # a constexpr, so fp64 kernels get it in full precision
    den_co = 1.0 + mean_sim + eps
    den_di = (1.0 - mean_sim) + eps

    c = j * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    num_s = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    num_t = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for k0 in range(0, n_pblocks, BLOCK_N):
        k = k0 + n_range
        rows = part_ptr + ((b * n_pblocks + k) * 2 * C)[:, None] + c[None, :]
        mask = (k < n_pblocks)[:, None] & c_ok[None, :]
        num_s += tl.load(rows, mask=mask, other=0.0)
        num_t += tl.load(rows + C, mask=mask, other=0.0)
    pooled_s = tl.sum(num_s, axis=0) / (HW * den_co)
    pooled_t = tl.sum(num_t, axis=0) / (HW * den_di)
    tl.store(pooled_s_ptr + b * C + c, to_output(pooled_s, pooled_s_ptr), mask=c_ok)
    tl.store(pooled_t_ptr + b * C + c, to_output(pooled_t, pooled_t_ptr), mask=c_ok)

    p = j * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    sim = tl.load(attn_co_ptr + b * HW + p, mask=p_ok, other=0.0)  # raw S from the first kernel
    tl.store(attn_co_ptr + b * HW + p, (1.0 + sim) / den_co, mask=p_ok)
    tl.store(attn_di_ptr + b * HW + p, (1.0 - sim) / den_di, mask=p_ok)


@triton.jit
def _adm_backward_kernel(
    x_ptr, g_ptr, attn_ptr, out_ptr,
    C, HW, n_cblocks, n_pblocks,
    g_stride_b, g_stride_c, a_stride_b, a_stride_p,
    ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    pb = pid % n_pblocks
    cb = (pid // n_pblocks) % n_cblocks
    b = (pid // (n_pblocks * n_cblocks)).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = c < C
    p_ok = p < HW
    g = tl.load(g_ptr + b * g_stride_b + c * g_stride_c, mask=c_ok, other=0.0).to(ACC)
    a = tl.load(attn_ptr + b * a_stride_b + p * a_stride_p, mask=p_ok, other=0.0).to(ACC)
    offs = b * C * HW + feature_offsets(c, p, C, HW, CHANNELS_LAST)
    mask = c_ok[:, None] & p_ok[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    grad = tl.where(x > 0.0, (g / HW)[:, None] * a[None, :], 0.0)
    tl.store(out_ptr + offs, to_output(grad, out_ptr), mask=mask)


def _partials_blocks(C: int, HW: int, channels_last: bool) -> tuple[int, int, bool]:
    """``(BLOCK_C, BLOCK_P, one_tile)`` of the forward kernel: tiles of at most _TILE elements
    per input, at least 16 along each axis; in the two-pass case the unit-stride axis gets the
    longer side. Reasonable defaults, not yet tuned on a GPU."""
    block_c = pow2_block(C, 16, _TILE)
    if block_c * 16 <= _TILE:  # the whole channel vector of >= 16 pixels fits in one tile
        return block_c, pow2_block(HW, 16, min(64, _TILE // block_c)), True
    block_c, block_p = (64, 32) if channels_last else (32, 64)
    return block_c, pow2_block(HW, 16, block_p), False


def _num_warps(tile_elements: int) -> int:
    return 8 if tile_elements > 2048 else 4


def adm_pool_forward(feat_s: torch.Tensor, feat_t: torch.Tensor, eps: float):
    """``(pooled_s, pooled_t, attn_co, attn_di)``: pooled ``[B, C]`` in the input dtype, the
    maps ``[B, H, W]`` in the accumulation dtype (fp32, fp64 for fp64 input)."""
    check_feature_pair("adm_pool", feat_s, feat_t)
    check_device("adm_pool", feat_s)
    s, channels_last = dense_feature(feat_s)
    t = in_layout(feat_t, channels_last)
    B, C, H, W = s.shape
    HW = H * W
    acc = opmath_dtype(s.dtype)
    pooled_s = s.new_empty((B, C))
    pooled_t = s.new_empty((B, C))
    attn_co = s.new_empty((B, H, W), dtype=acc)
    attn_di = s.new_empty((B, H, W), dtype=acc)
    if B * HW == 0:  # nothing to pool over: zeros, as the C++ kernels
        return pooled_s.zero_(), pooled_t.zero_(), attn_co, attn_di

    block_c, block_p, one_tile = _partials_blocks(C, HW, channels_last)
    n_pblocks = triton.cdiv(HW, block_p)
    sim_part = s.new_empty((B, n_pblocks), dtype=acc)
    partials = s.new_empty((B, n_pblocks, 2, C), dtype=acc)
    block_cr = pow2_block(C, 16, 128)
    block_pr = pow2_block(HW, 16, 1024)
    n_split = max(triton.cdiv(C, block_cr), triton.cdiv(HW, block_pr))
    with launch_guard(s):
        _adm_partials_kernel[(n_pblocks, B)](
            s, t, attn_co, sim_part, partials, C, HW, n_pblocks,
            EPS=COS_EPS, ACC=acc_type(s.dtype), CHANNELS_LAST=channels_last, ONE_TILE=one_tile,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=_num_warps(block_c * block_p),
        )
        _adm_finalize_kernel[(n_split, B)](
            sim_part, partials, pooled_s, pooled_t, attn_co, attn_di, C, HW, n_pblocks,
            EPS=eps, ACC=acc_type(s.dtype), BLOCK_N=pow2_block(n_pblocks, 2, 32), BLOCK_C=block_cr,
            BLOCK_P=block_pr,
        )
    return pooled_s, pooled_t, attn_co, attn_di


def adm_pool_backward(grad_pooled: torch.Tensor, feat: torch.Tensor, attn: torch.Tensor):
    """``grad_pooled[b, c] * attn[b, h, w] / HW * (feat > 0)``, in the layout of ``feat``."""
    op = "_adm_pool_backward"
    if feat.dim() != 4:
        raise ValueError(f"{op}: feat must be [B, C, H, W], got shape {tuple(feat.shape)}")
    B, C, H, W = feat.shape
    if grad_pooled.shape != (B, C):
        raise ValueError(
            f"{op}: grad_pooled must be [B, C] = {[B, C]}, got {tuple(grad_pooled.shape)}"
        )
    check_pixel_map(op, "attn", attn, feat)
    check_device(op, feat)
    x, channels_last = dense_feature(feat)
    grad = torch.empty_like(x)  # same strides as x, so the kernel's offsets address both
    if x.numel() == 0:
        return grad
    HW = H * W
    attn, a_stride_b, a_stride_p = pixel_map(attn)
    block_c, block_p = (64, 32) if channels_last else (32, 64)
    block_c = pow2_block(C, 16, block_c)
    block_p = pow2_block(HW, 16, block_p)
    n_cblocks, n_pblocks = triton.cdiv(C, block_c), triton.cdiv(HW, block_p)
    with launch_guard(x):
        _adm_backward_kernel[(B * n_cblocks * n_pblocks,)](
            x, grad_pooled, attn, grad, C, HW, n_cblocks, n_pblocks,
            grad_pooled.stride(0), grad_pooled.stride(1), a_stride_b, a_stride_p,
            ACC=acc_type(x.dtype), CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p,
        )
    return grad
