"""Shared parity machinery: backends to test, inputs, and the low-precision error rule."""
from __future__ import annotations

import zlib

import pytest
import torch

from kdengine.ops import available_impls

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def impl_params():
    """(impl, device) pairs, each skipped where that backend is missing."""
    cases = []
    for impl, device, marks in (
        ("cpu", "cpu", []),
        ("triton", "cpu", []),
        ("cuda", "cuda", [pytest.mark.cuda]),
        ("triton", "cuda", [pytest.mark.cuda]),
    ):
        cases.append(pytest.param(impl, device, marks=marks, id=f"{impl}-{device}"))
    return cases


def require(impl: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if impl not in available_impls(torch.device(device)):
        pytest.skip(f"impl {impl!r} not available on {device}")


def make_pair(shape, dtype=torch.float32, device="cpu", layout="contiguous", zero_pixels=False):
    """Correlated student/teacher features (cosines spread over [-1, 1]) in the given layout."""
    # crc32, not hash(): str hashes are salted per process, which would change the data every run
    gen = torch.Generator().manual_seed(zlib.crc32(repr((tuple(shape), str(dtype), layout)).encode()))
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    s = base + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    t = 0.5 * base + noise
    if zero_pixels and shape[2] * shape[3] > 1:
        s[:, :, 0, 0] = 0  # zero student vector
        t[:, :, -1, -1] = 0  # zero teacher vector
    if layout == "noncontiguous":
        # A view with channel stride 2: the kernels must see through (or copy) it.
        wide = torch.stack([s, torch.randn_like(s)], dim=2).flatten(1, 2)
        wide_t = torch.stack([t, torch.randn_like(t)], dim=2).flatten(1, 2)
        s, t = wide[:, ::2], wide_t[:, ::2]
        assert not s.is_contiguous()
    s, t = s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)
    if layout == "channels_last":
        s, t = s.contiguous(memory_format=torch.channels_last), t.contiguous(memory_format=torch.channels_last)
    return s, t


def assert_within_rule(out, ref_lowp, ref64, what=""):
    """Kernel error against fp64 is at most 2x the reference's error in the same dtype (plus one
    ulp of the output scale, so exact references don't demand bit-exact kernels)."""
    out, ref_lowp = out.double(), ref_lowp.double()
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = (out - ref64).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_lowp - ref64).abs().max().item() if out.numel() else 0.0
    ulp = torch.finfo(torch.float32).eps * max(ref64.abs().max().item() if out.numel() else 0.0, 1e-30)
    assert err <= 2 * ref_err + 4 * ulp, f"{what}: kernel error {err:.3e} > 2 x reference error {ref_err:.3e}"
