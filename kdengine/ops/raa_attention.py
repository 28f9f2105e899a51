"""raa_attention: PAT's region-aware attention, a multi-head self-attention over the RAA tokens
with a positional encoding added to the queries and keys (not the values).

    Q = q + pos,  K = k + pos,  per head h of d = D / heads channels:
    out_h = softmax(Q_h K_h^T / sqrt(d)) v_h,  heads merged back to [B, N, D]

``pos`` is token-indexed ``[N, D]`` (the method as described) or batch-indexed ``[B, 1, D]`` (the
authors' code: sample b gets encoding row b on all its tokens). No output projection, no dropout.

The fused kernels keep one (batch, head)'s whole sequence on chip (N <= 256 tokens, d <= 128)
and save only the per-row log-sum-exp of the scores; the backward recomputes the probabilities
from q, k, pos and it (flash-attention style).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from ._common import FLOATING, compiled_op_registered, define_triton_op, opmath_dtype, resolve_impl

#: The kernels' limits: tokens per sequence and channels per head (one sequence on chip).
MAX_TOKENS = 256
MAX_HEAD_DIM = 128


def raa_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, heads: int
) -> torch.Tensor:
    """Pure-PyTorch oracle: the authors' eager matmul-softmax-matmul (``RegionAttention.forward``)."""
    B, N, D = q.shape
    d = D // heads

    def split(x):  # [B, N, D] -> [B, heads, N, d]
        return x.reshape(B, N, heads, d).transpose(1, 2)

    scores = split(q + pos) @ split(k + pos).transpose(-2, -1) * d**-0.5
    out = scores.softmax(dim=-1) @ split(v)
    return out.transpose(1, 2).reshape(B, N, D)


def check_raa_inputs(q, k, v, pos, heads) -> None:
    """Refuse, naming the argument and the shapes, anything raa_attention cannot take.

    Args:
        q, k, v: ``[B, N, D]`` tensors of one floating dtype and device.
        pos: ``[N, D]`` or ``[B, 1, D]``, same dtype and device.
        heads: a positive divisor of D.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a dtype that is not floating, a wrong rank or shape, different dtypes or
            devices, or heads not dividing D.
    """
    op = "raa_attention"
    for name, x in (("q", q), ("k", k), ("v", v), ("pos", pos)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOATING:
            raise ValueError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [B, N, D], got shape {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v), ("pos", pos)):
        if x.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{op}: {name} is on {x.device} but q is on {q.device}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{op}: {name} must have q's shape [B, N, D] = {tuple(q.shape)}, got {tuple(x.shape)}")
    B, N, D = q.shape
    if isinstance(heads, bool) or not isinstance(heads, int):
        raise TypeError(f"{op}: heads must be an int, got {type(heads).__name__}")
    if heads < 1 or D < heads or D % heads:
        raise ValueError(f"{op}: heads = {heads} must divide D = {D} (q's last dim, q {tuple(q.shape)}) and be >= 1")
    if tuple(pos.shape) not in ((N, D), (B, 1, D)):
        raise ValueError(
            f"{op}: pos must be [N, D] = {(N, D)} (token-indexed) or [B, 1, D] = {(B, 1, D)} "
            f"(batch-indexed) for q {tuple(q.shape)}, got {tuple(pos.shape)}"
        )


def _kernel_limit_error(q: torch.Tensor, heads: int) -> Optional[str]:
    """Why the kernels cannot take this shape, or None."""
    _, N, D = q.shape
    if N > MAX_TOKENS:
        return f"q has N = {N} tokens (q {tuple(q.shape)}); the kernels take at most {MAX_TOKENS}"
    if D // heads > MAX_HEAD_DIM:
        return (
            f"the head dim D / heads = {D} / {heads} = {D // heads} (q {tuple(q.shape)}) exceeds the "
            f"kernels' {MAX_HEAD_DIM}"
        )
    return None


def raa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    heads: int,
    *,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Fused multi-head attention with a positional encoding on queries and keys.

    Args:
        q, k, v: ``[B, N, D]`` in one dtype (fp32/fp16/bf16; fp64 for gradcheck) and device. Rows
            must be unit-stride along D to be read in place (e.g. ``kv.chunk(2, -1)``); other
            layouts are copied once.
        pos: ``[N, D]`` (token-indexed) or ``[B, 1, D]`` (batch-indexed, the authors' code).
        heads: the number of heads; the head dim is ``D // heads``.
        impl: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None: the compiled kernel
            of the tensors' device, else the reference (also the reference when the shape exceeds
            the kernels' limits, N <= 256 and head dim <= 128; an explicit kernel refuses it).

    Returns:
        ``out [B, N, D]`` in the input dtype (fp32 accumulation), differentiable with respect to
        q, k, v and pos (pos's gradient is the sum of the query- and key-side ones, reduced over
        the batch for ``[N, D]`` and over the tokens for ``[B, 1, D]``).

    Raises:
        TypeError, ValueError: bad arguments, named with their shapes; a kernel asked for a shape
            beyond its limits.
        RuntimeError: an ``impl`` not available on the tensors' device.
    """
    check_raa_inputs(q, k, v, pos, heads)
    explicit = impl is not None
    impl = resolve_impl("raa_attention", impl, q)
    if impl != "reference":
        limit = _kernel_limit_error(q, heads)
        if limit is not None and explicit:
            raise ValueError(f"raa_attention: {limit} (impl={impl!r}; impl='reference' has no limit)")
        if limit is not None:
            impl = "reference"
    if impl == "reference":
        return raa_attention_reference(q, k, v, pos, heads)
    op = torch.ops.kdengine.raa_attention_triton if impl == "triton" else torch.ops.kdengine.raa_attention
    out, _ = op(q, k, v, pos, heads)
    return out


# ---------------------------------------------------------------- torch.library registration


def _register(forward_name: str, backward_name: str) -> None:
    backward_op = getattr(torch.ops.kdengine, backward_name)

    @torch.library.register_fake(f"kdengine::{forward_name}")
    def _(q, k, v, pos, heads):
        B, N, D = q.shape
        return q.new_empty((B, N, D)), q.new_empty((B, heads, N), dtype=opmath_dtype(q.dtype))

    @torch.library.register_fake(f"kdengine::{backward_name}")
    def _(grad_out, q, k, v, pos, lse, heads):
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), pos.new_empty(pos.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, pos, heads = inputs
        _, lse = output
        ctx.save_for_backward(q, k, v, pos, lse)
        ctx.heads = heads
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return None, None, None, None, None
        q, k, v, pos, lse = ctx.saved_tensors
        grads = backward_op(grad_out, q, k, v, pos, lse, ctx.heads)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])), None)

    torch.library.register_autograd(f"kdengine::{forward_name}", backward, setup_context=setup_context)


def _triton_forward(q, k, v, pos, heads):
    from .triton import raa_attention as kernels

    return kernels.raa_attention_forward(q, k, v, pos, heads)


def _triton_backward(grad_out, q, k, v, pos, lse, heads):
    from .triton import raa_attention as kernels

    return kernels.raa_attention_backward(grad_out, q, k, v, pos, lse, heads)


if compiled_op_registered("raa_attention"):
    _register("raa_attention", "_raa_attention_backward")

if _extension.HAS_TRITON:
    define_triton_op(
        "raa_attention_triton",
        "(Tensor q, Tensor k, Tensor v, Tensor pos, int heads) -> (Tensor, Tensor)",
        _triton_forward,
    )
    define_triton_op(
        "_raa_attention_backward_triton",
        "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor pos, Tensor lse, int heads) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        _triton_backward,
    )
    _register("raa_attention_triton", "_raa_attention_backward_triton")
