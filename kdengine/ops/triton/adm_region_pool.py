"""Triton kernels of adm_region_pool (see kdengine/ops/adm_region_pool.py for the maths).

Forward, two launches:
  1. ``_region_partials_kernel``, one program per (pixel block, image): the pixel count of every
     class in the block, and for each class present the sums of attn * relu(x) over its pixels,
     per channel, into ``partials[B, n_blocks, K, C]`` (rows of absent classes are not written).
     A block of a label map holds few classes, so the feature tile is reread (from cache) a few
     times rather than once per class.
  2. ``_region_finalize_kernel``, one program per (class, image, channel block): the sum of the
     present rows over the pixel blocks, divided by the class's pixel count.
No atomics: the reductions run in a fixed order, so results are deterministic; no host syncs.
Backward is one elementwise pass: grad_x = scale[b, label, c] * attn[b, p] * (x > 0) at pooled
pixels, with scale = grad_pooled / count.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import opmath_dtype
from ..adm_region_pool import check_region_inputs
from ._common import (
    acc_type,
    check_device,
    check_pixel_map,
    dense_feature,
    feature_offsets,
    launch_guard,
    pixel_map,
    pow2_block,
    to_output,
)


@triton.jit
def _pooled_classes(lab_ptr, p, p_ok, K, IGNORE):
    """The class of each pixel of a block, -1 where it is pooled nowhere."""
    lab = tl.load(lab_ptr + p, mask=p_ok, other=-1)
    pooled = p_ok & (lab >= 0) & (lab < K) & (lab != IGNORE)
    return tl.where(pooled, lab, -1)


@triton.jit
def _region_partials_kernel(
    x_ptr, attn_ptr, lab_ptr, part_ptr, cnt_ptr,
    C, HW, K, IGNORE, n_pblocks, a_stride_b, a_stride_p,
    ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    klass = _pooled_classes(lab_ptr + b * HW, p, p_ok, K, IGNORE)
    w = tl.load(attn_ptr + b * a_stride_b + p * a_stride_p, mask=p_ok, other=0.0).to(ACC)
    x_img = x_ptr + b * C * HW
    slot = b * n_pblocks + pb
    for k in range(0, K):
        in_k = klass == k
        n_k = tl.sum(in_k.to(tl.int32), axis=0)
        tl.store(cnt_ptr + slot * K + k, n_k)
        if n_k > 0:
            w_k = tl.where(in_k, w, 0.0)
            row = part_ptr + (slot * K + k) * C
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                mask = (c < C)[:, None] & in_k[None, :]
                x = tl.load(x_img + feature_offsets(c, p, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(ACC)
                tl.store(row + c, tl.sum(tl.maximum(x, 0.0) * w_k[None, :], axis=1), mask=c < C)


@triton.jit
def _region_finalize_kernel(
    part_ptr, cnt_ptr, pooled_ptr, count_ptr,
    C, K, n_pblocks,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    total = tl.zeros([BLOCK_N], tl.int64)
    sums = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for j0 in range(0, n_pblocks, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        slot = b * n_pblocks + j
        n = tl.load(cnt_ptr + slot * K + k, mask=j < n_pblocks, other=0)
        total += n
        rows = part_ptr + ((slot * K + k) * C)[:, None] + c[None, :]
        sums += tl.load(rows, mask=(n > 0)[:, None] & c_ok[None, :], other=0.0)  # absent rows unread
    count = tl.sum(total, axis=0)
    pooled = tl.where(count > 0, tl.sum(sums, axis=0) / tl.maximum(count, 1).to(ACC), 0.0)
    tl.store(pooled_ptr + (b * K + k) * C + c, to_output(pooled, pooled_ptr), mask=c_ok)
    if cb == 0:
        tl.store(count_ptr + b * K + k, count)


@triton.jit
def _region_backward_kernel(
    x_ptr, scale_ptr, attn_ptr, lab_ptr, out_ptr,
    C, HW, K, IGNORE, n_cblocks, n_pblocks, a_stride_b, a_stride_p,
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
    klass = _pooled_classes(lab_ptr + b * HW, p, p_ok, K, IGNORE)
    a = tl.load(attn_ptr + b * a_stride_b + p * a_stride_p, mask=p_ok, other=0.0).to(ACC)
    offs = b * C * HW + feature_offsets(c, p, C, HW, CHANNELS_LAST)
    mask = c_ok[:, None] & p_ok[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    pooled = c_ok[:, None] & (klass >= 0)[None, :]
    scale = tl.load(scale_ptr + (b * K + klass)[None, :] * C + c[:, None], mask=pooled, other=0.0)
    grad = tl.where(pooled & (x > 0.0), scale * a[None, :], 0.0)
    tl.store(out_ptr + offs, to_output(grad, out_ptr), mask=mask)


def _blocks(C: int, HW: int, channels_last: bool) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)``: the unit-stride axis gets the longer side. Reasonable defaults, not
    yet tuned on a GPU."""
    block_c, block_p = (64, 32) if channels_last else (32, 64)
    return pow2_block(C, 16, block_c), pow2_block(HW, 16, block_p)


def region_pool_forward(feat, attn, labels, num_classes: int, ignore_index: int):
    """``(pooled [B, K, C]`` in feat's dtype, ``count [B, K]`` int64)."""
    op = "adm_region_pool"
    labels = check_region_inputs(feat, attn, labels, num_classes).contiguous()
    check_device(op, feat)
    x, channels_last = dense_feature(feat)
    B, C, H, W = x.shape
    HW, K = H * W, num_classes
    acc = opmath_dtype(x.dtype)
    pooled = x.new_empty((B, K, C))
    count = x.new_empty((B, K), dtype=torch.int64)
    if B * HW == 0:
        return pooled.zero_(), count.zero_()
    block_c, block_p = _blocks(C, HW, channels_last)
    n_pblocks = triton.cdiv(HW, block_p)
    partials = x.new_empty((B, n_pblocks, K, max(C, 1)), dtype=acc)
    counts = x.new_empty((B, n_pblocks, K), dtype=torch.int32)
    attn, a_stride_b, a_stride_p = pixel_map(attn)
    block_cf = pow2_block(C, 16, 128)
    with launch_guard(x):
        _region_partials_kernel[(n_pblocks, B)](
            x, attn, labels, partials, counts, C, HW, K, ignore_index, n_pblocks, a_stride_b, a_stride_p,
            ACC=acc_type(x.dtype), CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p,
        )
        _region_finalize_kernel[(K, B, max(1, triton.cdiv(C, block_cf)))](
            partials, counts, pooled, count, C, K, n_pblocks,
            ACC=acc_type(x.dtype), BLOCK_N=pow2_block(n_pblocks, 2, 32), BLOCK_C=block_cf,
        )
    return pooled, count


def region_pool_backward(grad_pooled, feat, attn, labels, count, ignore_index: int):
    """``grad_pooled[b, k, c] / count[b, k] * attn[b, p] * (feat > 0)`` at the pixels of class k,
    in the layout of ``feat``."""
    op = "_adm_region_pool_backward"
    if feat.dim() != 4:
        raise ValueError(f"{op}: feat must be [B, C, H, W], got shape {tuple(feat.shape)}")
    B, C, H, W = feat.shape
    if grad_pooled.dim() != 3 or grad_pooled.shape[0] != B or grad_pooled.shape[2] != C:
        raise ValueError(
            f"{op}: grad_pooled must be [B, K, C] with B = {B} and C = {C}, got {tuple(grad_pooled.shape)}"
        )
    K = grad_pooled.shape[1]
    if tuple(count.shape) != (B, K):
        raise ValueError(f"{op}: count must be [B, K] = {[B, K]}, got {tuple(count.shape)}")
    check_pixel_map(op, "attn", attn, feat)
    check_pixel_map(op, "labels", labels, feat)
    check_device(op, feat)
    x, channels_last = dense_feature(feat)
    grad = torch.empty_like(x)  # same strides as x, so the kernel's offsets address both
    if x.numel() == 0:
        return grad
    HW = H * W
    acc = opmath_dtype(x.dtype)
    scale = (grad_pooled.to(acc) / count.clamp_min(1).to(acc).unsqueeze(-1)).contiguous()
    attn, a_stride_b, a_stride_p = pixel_map(attn)
    block_c, block_p = _blocks(C, HW, channels_last)
    n_cblocks, n_pblocks = triton.cdiv(C, block_c), triton.cdiv(HW, block_p)
    with launch_guard(x):
        _region_backward_kernel[(B * n_cblocks * n_pblocks,)](
            x, scale, attn, labels.long().contiguous(), grad, C, HW, K, ignore_index, n_cblocks, n_pblocks,
            a_stride_b, a_stride_p,
            ACC=acc_type(x.dtype), CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p,
        )
    return grad
