"""Triton kernels of adm_maps (see kdengine/ops/adm_maps.py for the maths).

Two launches, each input read once:
  1. ``_maps_partials_kernel``, one program per (pixel block, image): S of its pixels from a loop
     over channel blocks, parked in ``attn_co``, and the sum of S and the number of pixels over
     its valid pixels, written to ``partials[B, n_blocks, 2]``.
  2. ``_maps_finalize_kernel``, a few programs per image: the mean over the valid pixels (0 when
     there are none), then both maps from the parked S.
No atomics: the reductions run in a fixed order, so results are deterministic; no host syncs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import COS_EPS, check_feature_pair, opmath_dtype
from ._common import (
    acc_type,
    check_device,
    cosine_from_norms,
    dense_feature,
    in_layout,
    launch_guard,
    pixel_channel_sums,
    pow2_block,
    precise_sqrt,
)


@triton.jit
def _maps_partials_kernel(
    s_ptr, t_ptr, valid_ptr, sim_ptr, part_ptr,
    C, HW, n_pblocks,
    EPS: tl.constexpr, ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    s_img = s_ptr + b * C * HW
    t_img = t_ptr + b * C * HW
    dot, sq_s, sq_t = pixel_channel_sums(s_img, t_img, p, p_ok, C, HW, ACC, CHANNELS_LAST, BLOCK_C, BLOCK_P)
    sim = cosine_from_norms(dot, precise_sqrt(sq_s), precise_sqrt(sq_t), EPS)
    if HAS_VALID:
        ok = p_ok & (tl.load(valid_ptr + b * HW + p, mask=p_ok, other=0) != 0)
    else:
        ok = p_ok
    tl.store(sim_ptr + b * HW + p, sim, mask=p_ok)
    part = part_ptr + (b * n_pblocks + pb) * 2
    tl.store(part, tl.sum(tl.where(ok, sim, 0.0), axis=0))
    tl.store(part + 1, tl.sum(tl.where(ok, 1.0, 0.0).to(ACC), axis=0))


@triton.jit
def _maps_finalize_kernel(
    part_ptr, attn_co_ptr, attn_di_ptr, HW, n_pblocks,
    EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    total = tl.zeros([BLOCK_N], ACC)
    count = tl.zeros([BLOCK_N], ACC)
    for k0 in range(0, n_pblocks, BLOCK_N):
        k = k0 + tl.arange(0, BLOCK_N)
        rows = part_ptr + (b * n_pblocks + k) * 2
        total += tl.load(rows, mask=k < n_pblocks, other=0.0)
        count += tl.load(rows + 1, mask=k < n_pblocks, other=0.0)
    total_sum = tl.sum(total, axis=0)
    count_sum = tl.sum(count, axis=0)
    # An image without valid pixels has mean 0: its maps stay finite (and unused).
    mean = tl.where(count_sum > 0, total_sum / tl.maximum(count_sum, 1.0), 0.0)
    eps = tl.full([], EPS, ACC)  # a constexpr, so fp64 kernels get it in full precision
    den_co = 1.0 + mean + eps
    den_di = (1.0 - mean) + eps
    p = j * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    sim = tl.load(attn_co_ptr + b * HW + p, mask=p_ok, other=0.0)  # raw S from the first kernel
    tl.store(attn_co_ptr + b * HW + p, (1.0 + sim) / den_co, mask=p_ok)
    tl.store(attn_di_ptr + b * HW + p, (1.0 - sim) / den_di, mask=p_ok)


def adm_maps_forward(feat_s: torch.Tensor, feat_t: torch.Tensor, valid, eps: float):
    """``(attn_co, attn_di)``, each ``[B, H, W]`` in the accumulation dtype (fp32, fp64 for fp64
    input)."""
    check_feature_pair("adm_maps", feat_s, feat_t)
    check_device("adm_maps", feat_s)
    s, channels_last = dense_feature(feat_s)
    t = in_layout(feat_t, channels_last)
    B, C, H, W = s.shape
    HW = H * W
    acc = opmath_dtype(s.dtype)
    attn_co = s.new_empty((B, H, W), dtype=acc)
    attn_di = s.new_empty((B, H, W), dtype=acc)
    if B * HW == 0:
        return attn_co, attn_di
    # The unit-stride axis gets the longer side of the tile.
    block_c, block_p = (64, 32) if channels_last else (32, 64)
    block_c = pow2_block(C, 16, block_c)
    block_p = pow2_block(HW, 16, block_p)
    n_pblocks = triton.cdiv(HW, block_p)
    partials = s.new_empty((B, n_pblocks, 2), dtype=acc)
    v = valid.contiguous() if valid is not None else s  # any pointer when there is no map
    block_pf = pow2_block(HW, 16, 1024)
    with launch_guard(s):
        _maps_partials_kernel[(n_pblocks, B)](
            s, t, v, attn_co, partials, C, HW, n_pblocks,
            EPS=COS_EPS, ACC=acc_type(s.dtype), CHANNELS_LAST=channels_last, HAS_VALID=valid is not None,
            BLOCK_C=block_c, BLOCK_P=block_p,
        )
        _maps_finalize_kernel[(triton.cdiv(HW, block_pf), B)](
            partials, attn_co, attn_di, HW, n_pblocks,
            EPS=eps, ACC=acc_type(s.dtype), BLOCK_N=pow2_block(n_pblocks, 2, 64), BLOCK_P=block_pf,
        )
    return attn_co, attn_di
