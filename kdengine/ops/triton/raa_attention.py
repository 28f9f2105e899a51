"""Triton kernels of raa_attention (see kdengine/ops/raa_attention.py for the maths).

Forward, one launch: a program per (query block, batch * head) walks the key blocks with an online
softmax (flash attention) and writes its rows of ``out`` and their log-sum-exp ``lse``. The
positional encoding is added to the query and key tiles as they are loaded.

Backward, two launches, both recomputing P = exp(S - lse) from q, k, pos and lse:
  1. ``_raa_bwd_dq_kernel``, per (query block, batch * head): Delta_i = sum_j P_ij dP_ij over
     all key blocks (dP = dO V^T), then dQ = s sum_j dS_ij K_j with dS = P (dP - Delta); stores
     dQ (accumulation dtype) and Delta.
  2. ``_raa_bwd_dkdv_kernel``, per (key block, batch * head): dV = sum_i P_ij dO_i and
     dK = s sum_i dS_ij Q_i over all query blocks.
The gradient of pos is dQ + dK reduced over the batch (pos [N, D]) or the tokens ([B, 1, D]).

On a GPU, fp16/bf16 tiles enter the products in their own dtype (tensor cores, fp32 accumulation)
and fp32 tiles in full fp32 (``input_precision="ieee"``, no TF32). The interpreter computes every
product in the accumulation dtype, since its bf16 arithmetic is wrong.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import opmath_dtype
from ..raa_attention import check_raa_inputs
from ._common import INTERPRET, acc_type, check_device, launch_guard, to_output


@triton.jit
def _load_tile(base, rows, cols, row_stride, N, d, ACC: tl.constexpr):
    """The [len(rows), len(cols)] tile of a head (element (i, c) at base + i * row_stride + c),
    zero outside the N x d head, in the accumulation dtype."""
    mask = (rows < N)[:, None] & (cols < d)[None, :]
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _dot(a, b, DOT: tl.constexpr, ACC: tl.constexpr):
    """a @ b with operands in DOT and the result in ACC."""
    return tl.dot(a.to(DOT), b.to(DOT), input_precision="ieee", out_dtype=ACC)


@triton.jit
def _raa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, lse_ptr,
    q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, pos_sb, pos_sn,
    N, D, d, heads,
    ACC: tl.constexpr, DOT: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    head = (bh % heads) * d
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    scale = tl.full([], SCALE, ACC)  # a constexpr, so fp64 kernels get it in full precision
    pos_b = pos_ptr + b * pos_sb + head
    q = _load_tile(q_ptr + b * q_sb + head, rows, cols, q_sn, N, d, ACC)
    q += _load_tile(pos_b, rows, cols, pos_sn, N, d, ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(0, N, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr + b * k_sb + head, keys, cols, k_sn, N, d, ACC)
        k += _load_tile(pos_b, keys, cols, pos_sn, N, d, ACC)
        v = _load_tile(v_ptr + b * v_sb + head, keys, cols, v_sn, N, d, ACC)
        s = _dot(q, tl.trans(k), DOT, ACC) * scale
        s = tl.where((keys < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, v, DOT, ACC)
        m_i = m_new
    out = acc / l_i[:, None]
    row_ok = rows < N
    offs = (b * N + rows)[:, None] * D + head + cols[None, :]
    tl.store(out_ptr + offs, to_output(out, out_ptr), mask=row_ok[:, None] & (cols < d)[None, :])
    tl.store(lse_ptr + bh * N + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _raa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, go_ptr, lse_ptr, dq_ptr, delta_ptr,
    q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, pos_sb, pos_sn, go_sb, go_sn,
    N, D, d, heads,
    ACC: tl.constexpr, DOT: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    head = (bh % heads) * d
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_D)
    scale = tl.full([], SCALE, ACC)  # a constexpr, so fp64 kernels get it in full precision
    pos_b = pos_ptr + b * pos_sb + head
    q = _load_tile(q_ptr + b * q_sb + head, rows, cols, q_sn, N, d, ACC)
    q += _load_tile(pos_b, rows, cols, pos_sn, N, d, ACC)
    go = _load_tile(go_ptr + b * go_sb + head, rows, cols, go_sn, N, d, ACC)
    lse = tl.load(lse_ptr + bh * N + rows, mask=row_ok, other=0.0)

    delta = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, N, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr + b * k_sb + head, keys, cols, k_sn, N, d, ACC)
        k += _load_tile(pos_b, keys, cols, pos_sn, N, d, ACC)
        v = _load_tile(v_ptr + b * v_sb + head, keys, cols, v_sn, N, d, ACC)
        p = tl.exp(_dot(q, tl.trans(k), DOT, ACC) * scale - lse[:, None])
        p = tl.where((keys < N)[None, :], p, 0.0)
        dp = _dot(go, tl.trans(v), DOT, ACC)
        delta += tl.sum(p * dp, axis=1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(0, N, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr + b * k_sb + head, keys, cols, k_sn, N, d, ACC)
        k += _load_tile(pos_b, keys, cols, pos_sn, N, d, ACC)
        v = _load_tile(v_ptr + b * v_sb + head, keys, cols, v_sn, N, d, ACC)
        p = tl.exp(_dot(q, tl.trans(k), DOT, ACC) * scale - lse[:, None])
        p = tl.where((keys < N)[None, :], p, 0.0)
        ds = p * (_dot(go, tl.trans(v), DOT, ACC) - delta[:, None])
        dq += _dot(ds, k, DOT, ACC)
    offs = (b * N + rows)[:, None] * D + head + cols[None, :]
    tl.store(dq_ptr + offs, dq * scale, mask=row_ok[:, None] & (cols < d)[None, :])
    tl.store(delta_ptr + bh * N + rows, delta, mask=row_ok)


@triton.jit
def _raa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, go_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, pos_sb, pos_sn, go_sb, go_sn,
    N, D, d, heads,
    ACC: tl.constexpr, DOT: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    nb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    head = (bh % heads) * d
    keys = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < N
    cols = tl.arange(0, BLOCK_D)
    scale = tl.full([], SCALE, ACC)  # a constexpr, so fp64 kernels get it in full precision
    pos_b = pos_ptr + b * pos_sb + head
    k = _load_tile(k_ptr + b * k_sb + head, keys, cols, k_sn, N, d, ACC)
    k += _load_tile(pos_b, keys, cols, pos_sn, N, d, ACC)
    v = _load_tile(v_ptr + b * v_sb + head, keys, cols, v_sn, N, d, ACC)

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q = _load_tile(q_ptr + b * q_sb + head, rows, cols, q_sn, N, d, ACC)
        q += _load_tile(pos_b, rows, cols, pos_sn, N, d, ACC)
        go = _load_tile(go_ptr + b * go_sb + head, rows, cols, go_sn, N, d, ACC)
        lse = tl.load(lse_ptr + bh * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + bh * N + rows, mask=row_ok, other=0.0)
        # Transposed tiles, [keys, rows]: P^T and dP^T = V dO^T.
        pt = tl.exp(_dot(k, tl.trans(q), DOT, ACC) * scale - lse[None, :])
        pt = tl.where(row_ok[None, :], pt, 0.0)
        dv += _dot(pt, go, DOT, ACC)
        dst = pt * (_dot(v, tl.trans(go), DOT, ACC) - delta[None, :])
        dk += _dot(dst, q, DOT, ACC)
    offs = (b * N + keys)[:, None] * D + head + cols[None, :]
    mask = key_ok[:, None] & (cols < d)[None, :]
    tl.store(dk_ptr + offs, dk * scale, mask=mask)
    tl.store(dv_ptr + offs, to_output(dv, dv_ptr), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A [B, N, D] tensor with unit stride along D (read in place), else a contiguous copy."""
    return x if x.stride(2) == 1 or x.shape[2] == 1 else x.contiguous()


def _pos_strides(pos: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(pos, batch stride, token stride)``: [N, D] is (0, D), [B, 1, D] is (D, 0)."""
    pos = pos.contiguous()
    D = pos.shape[-1]
    return (pos, D, 0) if pos.dim() == 3 else (pos, 0, D)


def _blocks(N: int, d: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D)``: tl.dot needs >= 16 along each axis. The interpreter runs
    one block per sequence (its cost is per program and per loop step); a GPU 64-token tiles, a
    reasonable default not yet tuned on one."""
    block_d = max(16, triton.next_power_of_2(d))
    block = max(16, triton.next_power_of_2(N))
    if not INTERPRET:
        block = min(block, 64)
    return block, block, block_d


def _dot_dtype(dtype: torch.dtype):
    if not INTERPRET and dtype in (torch.float16, torch.bfloat16):
        return tl.float16 if dtype == torch.float16 else tl.bfloat16
    return acc_type(dtype)


def _check(op: str, q, k, v, pos, heads) -> None:
    check_raa_inputs(q, k, v, pos, heads)
    check_device(op, q)


def raa_attention_forward(q, k, v, pos, heads: int):
    """``(out, lse)``: out ``[B, N, D]`` in the input dtype, lse ``[B, heads, N]`` in the
    accumulation dtype (fp32, fp64 for fp64 input)."""
    _check("raa_attention", q, k, v, pos, heads)
    B, N, D = q.shape
    d = D // heads
    out = q.new_empty((B, N, D))
    lse = q.new_empty((B, heads, N), dtype=opmath_dtype(q.dtype))
    if out.numel() == 0:
        return out, lse
    q, k, v = _rows(q), _rows(k), _rows(v)
    pos, pos_sb, pos_sn = _pos_strides(pos)
    block_m, block_n, block_d = _blocks(N, d)
    with launch_guard(q):
        _raa_fwd_kernel[(triton.cdiv(N, block_m), B * heads)](
            q, k, v, pos, out, lse,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pos_sb, pos_sn,
            N, D, d, heads,
            ACC=acc_type(q.dtype), DOT=_dot_dtype(q.dtype), SCALE=d**-0.5,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return out, lse


def raa_attention_backward(grad_out, q, k, v, pos, lse, heads: int):
    """``(grad_q, grad_k, grad_v, grad_pos)`` in the input dtype, from the forward's lse."""
    op = "_raa_attention_backward"
    _check(op, q, k, v, pos, heads)
    B, N, D = q.shape
    if grad_out.shape != q.shape:
        raise ValueError(
            f"{op}: grad_out must have q's shape [B, N, D] = {tuple(q.shape)}, got {tuple(grad_out.shape)}"
        )
    if lse.shape != (B, heads, N):
        raise ValueError(f"{op}: lse must be [B, heads, N] = {(B, heads, N)}, got {tuple(lse.shape)}")
    for name, x in (("grad_out", grad_out), ("lse", lse)):
        if x.device != q.device:
            raise ValueError(f"{op}: {name} is on {x.device} but q is on {q.device}")
    d = D // heads
    acc = opmath_dtype(q.dtype)
    dq = q.new_empty((B, N, D), dtype=acc)
    dk = q.new_empty((B, N, D), dtype=acc)
    gv = q.new_empty((B, N, D))
    if dq.numel() == 0:
        return dq.to(q.dtype), dk.to(q.dtype), gv, pos.new_zeros(pos.shape)
    q, k, v, go = _rows(q), _rows(k), _rows(v), _rows(grad_out.to(q.dtype))
    pos_c, pos_sb, pos_sn = _pos_strides(pos)
    lse = lse.to(acc).contiguous()
    delta = torch.empty_like(lse)
    block_m, block_n, block_d = _blocks(N, d)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pos_sb, pos_sn,
               go.stride(0), go.stride(1))
    meta = dict(ACC=acc_type(q.dtype), DOT=_dot_dtype(q.dtype), SCALE=d**-0.5, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=block_d)
    with launch_guard(q):
        _raa_bwd_dq_kernel[(triton.cdiv(N, block_m), B * heads)](
            q, k, v, pos_c, go, lse, dq, delta, *strides, N, D, d, heads, **meta
        )
        _raa_bwd_dkdv_kernel[(triton.cdiv(N, block_n), B * heads)](
            q, k, v, pos_c, go, lse, delta, dk, gv, *strides, N, D, d, heads, **meta
        )
    dpos = dq + dk
    dpos = dpos.sum(dim=1, keepdim=True) if pos.dim() == 3 else dpos.sum(dim=0)
    return dq.to(q.dtype), dk.to(q.dtype), gv, dpos.to(q.dtype)
