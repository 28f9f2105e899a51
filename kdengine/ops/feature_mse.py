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
    feat_s: torch.Tensor, feat_t: torch.Tensor, *, impl: Optional[str] = None
) -> torch.Tensor:
    """Mean squared error between a student and a (detached) teacher feature.

    Args:
        feat_s, feat_t: features of the same shape (any rank), dtype (fp32/fp16/bf16/fp64) and
            device.
        impl: as for :func:`kdengine.ops.adm_pool`.

    Returns:
        ``mean((feat_s - feat_t)^2)``, a 0-d tensor in the input dtype; the gradient flows into
        ``feat_s`` only.
    """
    check_feature_pair("feature_mse", feat_s, feat_t, require_4d=False)
    impl = resolve_impl("feature_mse", impl, feat_s)
    if impl == "reference":
        return feature_mse_reference(feat_s, feat_t)
    op = torch.ops.kdengine.feature_mse_triton if impl == "triton" else torch.ops.kdengine.feature_mse
    return op(feat_s, feat_t)


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


if compiled_op_registered("feature_mse"):
    _register("feature_mse", "_feature_mse_backward")

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
