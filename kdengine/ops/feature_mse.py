"""feature_mse: ``mean((feat_s - feat_t)^2)`` with no gradient into ``feat_t`` (paper Eq. 5,
the teacher is detached, Sec. 3.2). One fused pass forward, one pass backward."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import check_feature_pair, compiled_op_registered, define_triton_op, resolve_impl


def feature_mse_reference(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch oracle: Algorithm 1's ``F.mse_loss(fs, ft.detach())``."""
    return F.mse_loss(feat_s, feat_t.detach())


def feature_mse(
    feat_s: torch.Tensor,
    feat_t: torch.Tensor,
    *,
    impl: Optional[str] = None,
    grad_weight: Optional[float] = None,
) -> torch.Tensor:
    """Mean squared error between a student and a (detached) teacher feature.

    Args:
        feat_s, feat_t: features of the same shape (any rank), dtype (fp32/fp16/bf16/fp64) and
            device.
        impl: as for :func:`kdengine.ops.adm_pool`.
        grad_weight: the gradient this loss is expected to receive in backward, i.e. its weight in
            the summed total that ``backward()`` is called on (``gamma / 2^(N-i)`` for a stage of
            ADM's L_feat). With the CPU kernel, when ``feat_s`` requires a gradient, the forward
            then writes that gradient in the same pass over the inputs (both read once instead of
            twice; the gradient's buffer is held until backward), and a backward that brings
            exactly this weight returns it. Any other incoming gradient, or a second backward of a
            retained graph, computes it afresh: the values never depend on the hint. None: off.

    Returns:
        ``mean((feat_s - feat_t)^2)``, a 0-d tensor in the input dtype; the gradient flows into
        ``feat_s`` only.
    """
    check_feature_pair("feature_mse", feat_s, feat_t, require_4d=False)
    impl = resolve_impl("feature_mse", impl, feat_s)
    if impl == "reference":
        return feature_mse_reference(feat_s, feat_t)
    if impl == "triton":
        return torch.ops.kdengine.feature_mse_triton(feat_s, feat_t)
    if (grad_weight and impl == "cpu" and _HAS_WITH_GRAD and feat_s.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        # The weight as the incoming gradient will carry it: rounded to the loss's dtype.
        weight = torch.tensor(float(grad_weight), dtype=feat_s.dtype).item()
        return torch.ops.kdengine._feature_mse_and_grad(feat_s, feat_t, weight)[0]
    return torch.ops.kdengine.feature_mse(feat_s, feat_t)


# ---------------------------------------------------------------- torch.library registration


def _register(forward_name: str, backward_name: str) -> None:
    backward_op = getattr(torch.ops.kdengine, backward_name)

    @torch.library.register_fake(f"kdengine::{forward_name}")
    def _(feat_s, feat_t):
        return feat_s.new_empty(())

    @torch.library.register_fake(f"kdengine::{backward_name}")
    def _(grad, feat_s, feat_t):
        return torch.empty_like(feat_s)

    def setup_context(ctx, inputs, output):
        feat_s, feat_t = inputs
        ctx.save_for_backward(feat_s, feat_t)

    def backward(ctx, grad):
        feat_s, feat_t = ctx.saved_tensors
        d_s = backward_op(grad, feat_s, feat_t) if ctx.needs_input_grad[0] else None
        return d_s, None  # the teacher is detached by contract

    torch.library.register_autograd(
        f"kdengine::{forward_name}", backward, setup_context=setup_context
    )


def _triton_forward(feat_s, feat_t):
    from .triton import feature_mse as kernels

    return kernels.feature_mse_forward(feat_s, feat_t)


def _triton_backward(grad, feat_s, feat_t):
    from .triton import feature_mse as kernels

    return kernels.feature_mse_backward(grad, feat_s, feat_t)


def _register_with_grad() -> None:
    """Autograd of ``_feature_mse_and_grad``: its second output is the gradient for the incoming
    gradient ``grad_weight``; a backward that brings exactly that returns it (once: a retained
    graph's second backward, like any other incoming gradient, recomputes from the inputs)."""
    backward_op = torch.ops.kdengine._feature_mse_backward

    @torch.library.register_fake("kdengine::_feature_mse_and_grad")
    def _(feat_s, feat_t, grad_weight):
        return feat_s.new_empty(()), torch.empty_like(feat_s)

    def setup_context(ctx, inputs, output):
        feat_s, feat_t, grad_weight = inputs
        ctx.save_for_backward(feat_s, feat_t, output[1])
        ctx.mark_non_differentiable(output[1])
        # No zero-filled gradient for the buffer output: that would be one more pass over it.
        ctx.set_materialize_grads(False)
        ctx.grad_weight, ctx.buffer_unused = grad_weight, True

    def backward(ctx, grad, _grad_buffer):
        if not ctx.needs_input_grad[0] or grad is None:
            return None, None, None
        feat_s, feat_t, buffer = ctx.saved_tensors
        # Only an eager backward compares values; a traced one (fake or functional tensors,
        # whose type is a Tensor subclass) takes the recompute, which it can trace.
        eager = type(grad) is torch.Tensor and not torch.compiler.is_compiling()
        if ctx.buffer_unused and eager and grad.item() == ctx.grad_weight:
            ctx.buffer_unused = False
            return buffer, None, None
        return backward_op(grad, feat_s, feat_t), None, None

    torch.library.register_autograd("kdengine::_feature_mse_and_grad", backward, setup_context=setup_context)


_HAS_WITH_GRAD = compiled_op_registered("_feature_mse_and_grad")
if compiled_op_registered("feature_mse"):
    _register("feature_mse", "_feature_mse_backward")
if _HAS_WITH_GRAD:
    _register_with_grad()

if _extension.HAS_TRITON:
    define_triton_op(
        "feature_mse_triton", "(Tensor feat_s, Tensor feat_t) -> Tensor", _triton_forward
    )
    define_triton_op(
        "_feature_mse_backward_triton",
        "(Tensor grad, Tensor feat_s, Tensor feat_t) -> Tensor",
        _triton_backward,
    )
    _register("feature_mse_triton", "_feature_mse_backward_triton")
