"""What the Triton kernels share: device checks, feature layouts, dtypes, and small jit helpers.

Kernels read ``[B, C, H, W]`` features in either dense layout without a copy: the layout is a
``CHANNELS_LAST`` constexpr, so the compiler knows which axis is unit-stride (NCHW: channel
stride HW, pixel stride 1; NHWC: channel stride 1, pixel stride C) and coalesces along it.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._common import triton_interpreter

# Whether the kernels of this package were decorated for the interpreter: @triton.jit reads
# the mode when a kernel module is imported, not when the kernel is launched.
INTERPRET: bool = triton_interpreter()
_INTERPRET = tl.constexpr(INTERPRET)


def check_device(op: str, x: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, and on CPU tensors only through the interpreter."""
    if x.device.type == "cuda" or (x.device.type == "cpu" and INTERPRET):
        return
    if x.device.type == "cpu":
        raise RuntimeError(
            f"{op}: the Triton kernels got CPU tensors, but Triton runs on the CPU only in "
            "interpreter mode: set TRITON_INTERPRET=1 before kdengine's Triton kernels are first "
            "used, or move the tensors to a CUDA device (or use impl='cpu')"
        )
    raise RuntimeError(f"{op}: the Triton kernels take CUDA tensors, got a tensor on {x.device}")


def launch_guard(x: torch.Tensor):
    """Triton launches on the current device's current stream: make that x's device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def acc_type(dtype: torch.dtype):
    """Accumulation dtype of the kernels (as kdengine.ops._common.opmath_dtype, in Triton)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dense_feature(feat: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(tensor, channels_last)``: the feature itself when it is contiguous or channels_last,
    else one contiguous copy (slices, transposes)."""
    if feat.is_contiguous():
        return feat, False
    if feat.is_contiguous(memory_format=torch.channels_last):
        return feat, True
    return feat.contiguous(), False


def in_layout(feat: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The second feature of a pair in the first one's layout (a copy only when they differ)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return feat.contiguous(memory_format=fmt)


def pixel_map(m: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A ``[B, H, W]`` map as ``(tensor, stride_b, stride_p)``, the element of image b and pixel
    p = h * W + w sitting at ``b * stride_b + p * stride_p``. Contiguous maps and expanded
    gradients (stride 0, as from ``sim.sum().backward()``) need no copy; a map whose H and W
    cannot be flattened into one pixel axis is copied once (it is C times smaller than a feature).
    """
    _, H, W = m.shape
    stride_b, stride_h, stride_w = m.stride()
    if W == 1:
        return m, stride_b, stride_h
    if H == 1 or stride_h == W * stride_w:
        return m, stride_b, stride_w
    m = m.contiguous()
    return m, H * W, 1


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi] (lo, hi powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def check_pixel_map(op: str, name: str, m: torch.Tensor, feat: torch.Tensor) -> None:
    B, _, H, W = feat.shape
    if m.shape != (B, H, W):
        raise ValueError(
            f"{op}: {name} must be [B, H, W] = {[B, H, W]} to match the feature "
            f"{tuple(feat.shape)}, got {tuple(m.shape)}"
        )
    if m.device != feat.device:
        raise ValueError(f"{op}: {name} is on {m.device} but the feature is on {feat.device}")


# ---------------------------------------------------------------- jit helpers


@triton.jit
def feature_offsets(c, p, C, HW, CHANNELS_LAST: tl.constexpr):
    """Offsets of the [len(c), len(p)] tile of one image's [C, HW] feature block."""
    if CHANNELS_LAST:
        offs = c[:, None] + p[None, :] * C
    else:
        offs = c[:, None] * HW + p[None, :]
    return offs


@triton.jit
def pixel_channel_sums(s_img, t_img, p, p_ok, C, HW, ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per pixel of one image's ``BLOCK_P`` pixels ``p``: ``(sum_c s*t, sum_c s^2, sum_c t^2)`` over all
    C channels, in ``ACC`` — the reductions a cosine similarity over channels needs."""
    dot = tl.zeros([BLOCK_P], ACC)
    sq_s = tl.zeros([BLOCK_P], ACC)
    sq_t = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        offs = feature_offsets(c, p, C, HW, CHANNELS_LAST)
        mask = (c < C)[:, None] & p_ok[None, :]
        s = tl.load(s_img + offs, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_img + offs, mask=mask, other=0.0).to(ACC)
        dot += tl.sum(s * t, axis=0)
        sq_s += tl.sum(s * s, axis=0)
        sq_t += tl.sum(t * t, axis=0)
    return dot, sq_s, sq_t


@triton.jit
def precise_sqrt(x):
    """IEEE-rounded sqrt, as std::sqrt (tl.sqrt is an approximation for fp32)."""
    if x.dtype == tl.float32:
        y = tl.sqrt_rn(x)
    else:
        y = tl.sqrt(x)
    return y


@triton.jit
def cosine_from_norms(dot, norm_s, norm_t, EPS: tl.constexpr):
    """F.cosine_similarity: dot / (max(|s|, eps) * max(|t|, eps)). EPS is a constexpr so that
    fp64 kernels see it in full precision (runtime float arguments are fp32)."""
    eps = tl.full([], EPS, dot.dtype)
    return dot / (tl.maximum(norm_s, eps) * tl.maximum(norm_t, eps))


@triton.jit
def to_output(x, ptr):
    """x (accumulation dtype) rounded to the element type of ``ptr``, to nearest even.

    The interpreter truncates fp32 -> bf16 casts, so there the rounding is done on the bits.
    """
    if _INTERPRET and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += ((bits >> 16) & 1) + 0x7FFF
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(ptr.dtype.element_ty)
    return y
