"""What every kdengine op shares: input checks, backend choice, and the torch.library glue."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _extension

IMPLS = ("reference", "cpu", "cuda", "triton")
FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: The eps of the cosine similarity S in every op and backend: F.cosine_similarity's default, as
#: in the paper's Algorithm 1.
COS_EPS = 1e-8


def check_feature_pair(op: str, feat_s, feat_t, *, require_4d: bool = True) -> None:
    """Refuse, naming the argument and both shapes, anything the kernels cannot take.

    Args:
        op: the op's name, for the message.
        feat_s, feat_t: the features.
        require_4d: whether both must be ``[B, C, H, W]``.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: a dtype that is not floating, a wrong rank, or different shapes, dtypes or
            devices.
    """
    for name, x in (("feat_s", feat_s), ("feat_t", feat_t)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOATING:
            raise ValueError(
                f"{op}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}"
            )
        if require_4d and x.dim() != 4:
            raise ValueError(f"{op}: {name} must be [B, C, H, W], got shape {tuple(x.shape)}")
    if feat_s.shape != feat_t.shape:
        raise ValueError(
            f"{op}: feat_s and feat_t must have the same shape, got feat_s {tuple(feat_s.shape)} "
            f"and feat_t {tuple(feat_t.shape)}"
        )
    if feat_s.dtype != feat_t.dtype:
        raise ValueError(
            f"{op}: feat_s and feat_t must have the same dtype, got feat_s {feat_s.dtype} "
            f"and feat_t {feat_t.dtype}"
        )
    if feat_s.device != feat_t.device:
        raise ValueError(
            f"{op}: feat_s and feat_t must be on the same device, got feat_s on {feat_s.device} "
            f"and feat_t on {feat_t.device}"
        )


@torch.compiler.assume_constant_result  # triton's knobs are not traceable: a compiled graph keeps the mode it saw
def triton_interpreter() -> bool:
    """Whether Triton is in interpreter mode (``TRITON_INTERPRET=1``), in which it runs kernels on
    CPU tensors. The one place kdengine asks.

    ``@triton.jit`` reads the mode when a kernel module is imported, so
    :mod:`kdengine.ops.triton` fixes it (``INTERPRET``) when first loaded; before that, this
    answer follows the environment.

    Returns:
        False also when Triton is not installed.
    """
    if not _extension.HAS_TRITON:
        return False
    import triton

    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors in interpreter mode (tests)."""
    if not _extension.HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter()


def available_impls(device: torch.device) -> list[str]:
    """The backends this installation can run on a device.

    Args:
        device: the tensors' device.

    Returns:
        ``"reference"`` first, then those of ``"cpu"``, ``"cuda"``, ``"triton"`` that apply.
    """
    impls = ["reference"]
    if device.type == "cpu" and _extension.HAS_CPU_OPS:
        impls.append("cpu")
    if device.type == "cuda" and _extension.HAS_CUDA_OPS:
        impls.append("cuda")
    if triton_usable(device):
        impls.append("triton")
    return impls


def resolve_impl(op: str, impl: Optional[str], x: torch.Tensor) -> str:
    """The backend to run.

    Args:
        op: the op's name, for the messages.
        impl: the backend asked for, or None.
        x: an input tensor (its device decides).

    Returns:
        ``impl`` if given and available, else (None) the compiled kernel of the tensor's device,
        else ``"reference"``.

    Raises:
        ValueError: an unknown ``impl``.
        RuntimeError: an ``impl`` not available on the tensor's device.
    """
    device = x.device
    if impl is None:
        compiled = "cuda" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
        return compiled if compiled in available_impls(device) else "reference"
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS} or None, got {impl!r}")
    if impl not in available_impls(device):
        raise RuntimeError(
            f"{op}: impl={impl!r} is not available for tensors on {device} "
            f"(available: {available_impls(device)}; extension load error: {_extension.LOAD_ERROR})"
        )
    return impl


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: fp32, or fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def define_triton_op(name: str, schema: str, forward) -> None:
    """Registers ``kdengine::<name>`` (a Triton-backed op) for CPU and CUDA tensors.

    CPU only makes sense under TRITON_INTERPRET=1; the launcher itself raises otherwise.
    """
    qualname = f"kdengine::{name}"
    torch.library.define(qualname, schema)
    torch.library.impl(qualname, ("cpu", "cuda"))(forward)


def compiled_op_registered(name: str) -> bool:
    """Whether the extension registered ``torch.ops.kdengine.<name>``."""
    return _extension.HAS_CPU_OPS and hasattr(torch.ops.kdengine, name)
