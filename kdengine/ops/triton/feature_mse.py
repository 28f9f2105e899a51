"""Triton kernels of feature_mse: ``mean((s - t)^2)`` and ``grad * 2 (s - t) / N``.

Both inputs are walked as flat arrays in one shared dense layout. Forward: a fixed number of
programs (at most _MAX_PARTIALS) each sum (s - t)^2 over a grid-stride loop into one partial;
a single-program kernel adds the partials in fp64 (as the C++ kernel sums its grains in double)
and divides by N. Fixed order, no atomics: deterministic. Backward reads the incoming gradient
on the device, so nothing waits on the host (CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import check_feature_pair, opmath_dtype
from ._common import (
    acc_type,
    check_device,
    dense_feature,
    in_layout,
    launch_guard,
    pow2_block,
    to_output,
)

_BLOCK = 2048
_MAX_PARTIALS = 1024


@triton.jit
def _sq_diff_partials_kernel(s_ptr, t_ptr, part_ptr, N, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    acc = tl.zeros([BLOCK], ACC)
    for start in range(pid.to(tl.int64) * BLOCK, N, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        d = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) - tl.load(
            t_ptr + offs, mask=mask, other=0.0
        ).to(ACC)
        acc += d * d
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _mean_of_partials_kernel(part_ptr, out_ptr, n_parts, N, BLOCK: tl.constexpr):
    k = tl.arange(0, BLOCK)
    total = tl.sum(tl.load(part_ptr + k, mask=k < n_parts, other=0.0).to(tl.float64), axis=0)
    tl.store(out_ptr, to_output(total / N, out_ptr))


@triton.jit
def _mse_backward_kernel(s_ptr, t_ptr, g_ptr, out_ptr, N, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    scale = tl.load(g_ptr).to(ACC) * 2.0 / N
    d = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) - tl.load(
        t_ptr + offs, mask=mask, other=0.0
    ).to(ACC)
    tl.store(out_ptr + offs, to_output(scale * d, out_ptr), mask=mask)


def _flat_pair(feat_s: torch.Tensor, feat_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs in one dense layout (channels_last 4-D features are read as they are)."""
    if feat_s.dim() == 4:
        s, channels_last = dense_feature(feat_s)
        return s, in_layout(feat_t, channels_last)
    return feat_s.contiguous(), feat_t.contiguous()


def feature_mse_forward(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """0-d tensor in the input dtype; NaN for empty inputs, as F.mse_loss."""
    check_feature_pair("feature_mse", feat_s, feat_t, require_4d=False)
    check_device("feature_mse", feat_s)
    s, t = _flat_pair(feat_s, feat_t)
    N = s.numel()
    out = s.new_empty(())
    if N == 0:
        return out.fill_(float("nan"))
    n_parts = min(triton.cdiv(N, _BLOCK), _MAX_PARTIALS)
    partials = s.new_empty((n_parts,), dtype=opmath_dtype(s.dtype))
    with launch_guard(s):
        _sq_diff_partials_kernel[(n_parts,)](
            s, t, partials, N, ACC=acc_type(s.dtype), BLOCK=_BLOCK, num_warps=8
        )
        _mean_of_partials_kernel[(1,)](
            partials, out, n_parts, N, BLOCK=pow2_block(n_parts, 16, _MAX_PARTIALS)
        )
    return out


def feature_mse_backward(grad: torch.Tensor, feat_s: torch.Tensor, feat_t: torch.Tensor):
    """``grad * 2 (feat_s - feat_t) / N`` in the layout the forward read ``feat_s`` in."""
    check_feature_pair("_feature_mse_backward", feat_s, feat_t, require_4d=False)
    if grad.numel() != 1:
        raise ValueError(f"_feature_mse_backward: grad must be a scalar, got {tuple(grad.shape)}")
    check_device("_feature_mse_backward", feat_s)
    s, t = _flat_pair(feat_s, feat_t)
    out = torch.empty_like(s)
    N = s.numel()
    if N == 0:
        return out
    with launch_guard(s):
        _mse_backward_kernel[(triton.cdiv(N, _BLOCK),)](
            s, t, grad, out, N, ACC=acc_type(s.dtype), BLOCK=_BLOCK, num_warps=8
        )
    return out
