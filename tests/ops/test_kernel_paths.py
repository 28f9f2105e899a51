"""Parity of the compiled kernels on the paths that real training shapes take.

The kernels pick a branch from the dtype, layout, shape and pointer alignment of their inputs
(csrc/kernels/*.cuh: ``adm_pool_tiling`` and the ``vectorised`` tests of each launcher;
csrc/ops/cpu/*.cpp: ``pixel_chunks``, the 64-pixel tiles, the accumulator lanes). Each case below
is a shape training uses (ImageNet's last stage at B=256, an R18 stage 3, a segmentation map, a
ResNet-50 teacher's 2048 channels, ...) or one chosen for a branch (channels beyond the shared
memory budget, odd-offset views that defeat the 16-byte loads), and says which branch it covers.
``test_each_case_selects_its_branch`` recomputes, without a GPU, the selection rules for every
case and checks the branch it claims: when a kernel's thresholds change, it fails and the cases
must be chosen again.

Forward and backward are compared with the fp64 reference: fp32 (and fp64) tightly, fp16 / bf16
by the low-precision rule (the kernel's error against fp64 at most twice the error of the
reference computed in the same dtype). The CPU cases are smaller and run with 2 threads, which
fixes how the CPU kernels split the pixels.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

from kdengine.ops import (
    adm_pool,
    adm_pool_reference,
    cosine_similarity_map,
    cosine_similarity_map_reference,
    feature_mse,
    feature_mse_reference,
)

from .helpers import assert_within_rule, require

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
CPU_THREADS = 2

# ------------------------------------------------------------------------ the kernels' branch rules
# As csrc/kernels/common.cuh, adm_pool.cuh, cosine_similarity_map.cuh, feature_mse.cuh and
# csrc/ops/cpu/pixel_cosine.h, feature_mse_kernel.cpp choose (names as there).

THREADS = 256  # kThreads
WARPS = THREADS // 32
VEC_BYTES = 16  # kVecBytes
ADM_SMEM_BUDGET = 48 * 1024  # kAdmSmemBudget
ADM_MAX_TILE = 64  # kAdmMaxTile
ADM_TARGET_BLOCKS = 1024  # kAdmTargetBlocks
COS_TILE_NCHW, COS_TILE_NHWC = 64, 8  # kCosTileNCHW, kCosTileNHWC
MSE_MAX_BLOCKS, MSE_ELEMENTS_PER_THREAD = 1024, 64  # kMseMaxBlocks, kMseElementsPerThread
MAX_BLOCKS = 1 << 16  # elementwise_grid
CPU_TILE, CPU_LANES, CPU_ROW_LANES, CPU_GRAIN = 64, 32, 8, 1 << 15  # kTile, kLanes, kRowLanes, kGrain


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def _vec(dtype: torch.dtype) -> int:
    return VEC_BYTES // dtype.itemsize


def cuda_adm_pool_branch(dtype, nhwc: bool, shape, s_aligned: bool, t_aligned: bool) -> dict:
    """``adm_pool_tiling`` and the launchers' vectorisation tests."""
    B, C, H, W = shape
    HW = H * W
    size, acc = dtype.itemsize, (8 if dtype == F64 else 4)

    def tile_bytes(p):
        return _cdiv((p * C if nhwc else C * (p | 1)) * size, VEC_BYTES) * VEC_BYTES

    def smem_bytes(p, cached):
        pm = _pow2_ceil(p)
        return (2 * tile_bytes(p) if cached else 0) + (3 * WARPS * pm + pm + 2 * THREADS) * acc

    max_tile = next((p for p in range(min(ADM_MAX_TILE, HW), 0, -1) if smem_bytes(p, True) <= ADM_SMEM_BUDGET), 0)
    cached = max_tile > 0
    if not cached:
        max_tile = min(HW, 8 if nhwc else 32)
    v = _vec(dtype)
    vec_rows = cached and not nhwc and HW % v == 0 and max_tile >= v
    if vec_rows:
        max_tile -= max_tile % v
    tile = _cdiv(HW, _cdiv(HW, max_tile))
    if vec_rows:
        tile = _cdiv(tile, v) * v
    tiles = _cdiv(HW, tile)
    chunks = min(tiles, _cdiv(ADM_TARGET_BLOCKS, B))
    tiles_per_chunk = _cdiv(tiles, chunks)
    return {
        "cached": cached,  # tiles staged in shared memory (else read from global memory twice)
        "tile": tile,
        "tiles_per_chunk": tiles_per_chunk,
        "chunks": _cdiv(tiles, tiles_per_chunk),
        "last_tile": HW - (tiles - 1) * tile,
        "vectorised": cached and s_aligned and t_aligned and (C % v == 0 if nhwc else HW % v == 0 and tile % v == 0),
        "channel_groups": 1 if C >= THREADS else THREADS // C,  # accumulate_weighted_relu's pixel split
        # backward, per input (its gradient is a fresh, aligned allocation)
        "backward_vectorised": tuple(B * C * HW % v == 0 and aligned for aligned in (s_aligned, t_aligned)),
    }


def cuda_cosine_branch(dtype, nhwc: bool, shape, s_aligned: bool, t_aligned: bool) -> dict:
    """``cosine_tile`` and the backward's vectorisation test."""
    B, C, H, W = shape
    HW, v = H * W, _vec(dtype)
    tile = COS_TILE_NHWC if nhwc else COS_TILE_NCHW
    pm = _pow2_ceil(HW) if HW < tile else tile
    return {
        "pm": pm,
        "tiles": _cdiv(HW, pm),
        "last_tile": HW - (_cdiv(HW, pm) - 1) * pm,
        "backward_vectorised": B * C * HW % v == 0 and s_aligned and t_aligned,
        # a 16-byte vector of the backward spans two pixels (NHWC) or two channel rows (NCHW)
        "vector_wraps": (C if nhwc else HW) % v != 0,
    }


def cuda_feature_mse_branch(dtype, numel: int, s_aligned: bool, t_aligned: bool) -> dict:
    v = _vec(dtype)
    vectorised = numel % v == 0 and s_aligned and t_aligned
    nvec = numel // v if vectorised else numel
    blocks = min(_cdiv(numel, THREADS * MSE_ELEMENTS_PER_THREAD), MSE_MAX_BLOCKS)
    grid = min(_cdiv(nvec, THREADS), MAX_BLOCKS)
    return {
        "vectorised": vectorised,  # forward and backward alike (the gradient is aligned)
        "blocks": blocks,
        "forward_passes": _cdiv(nvec, blocks * THREADS),  # grid-stride iterations per thread
        "backward_passes": _cdiv(nvec, grid * THREADS),
    }


def cpu_adm_pool_branch(nhwc: bool, shape, threads: int) -> dict:
    """``pixel_chunks`` and the accumulator lanes of the CPU kernel."""
    B, C, H, W = shape
    HW = H * W
    tiles = _cdiv(HW, CPU_TILE)
    chunks = min(tiles, max(1, _cdiv(4 * threads, B)))
    tiles_per_chunk = _cdiv(tiles, chunks)
    last_tile = HW - (tiles - 1) * CPU_TILE
    return {
        "chunks": _cdiv(tiles, tiles_per_chunk),
        "tiles_per_chunk": tiles_per_chunk,
        "last_tile": last_tile,
        # the scalar tails after the unrolled lanes: NCHW rows of a tile, NHWC channel vectors
        "lane_tail": C % CPU_LANES if nhwc else last_tile % CPU_ROW_LANES,
    }


def cpu_cosine_branch(nhwc: bool, shape) -> dict:
    B, C, H, W = shape
    HW = H * W
    tiles = _cdiv(HW, CPU_TILE)
    return {"tiles": tiles, "last_tile": HW - (tiles - 1) * CPU_TILE, "lane_tail": C % CPU_LANES if nhwc else 0}


def cpu_feature_mse_branch(numel: int, threads: int) -> dict:
    """``at::parallel_reduce``'s split of the elements over the threads, then each thread's range
    in grains of ``kGrain``: one lane-accumulated sum per grain, each with a scalar tail."""
    if numel <= CPU_GRAIN or threads == 1:
        ranges = [numel]
    else:
        parts = min(threads, _cdiv(numel, CPU_GRAIN))
        chunk = _cdiv(numel, parts)
        ranges = [min(chunk, numel - i * chunk) for i in range(parts) if i * chunk < numel]
    grains = [min(CPU_GRAIN, n - g0) for n in ranges for g0 in range(0, n, CPU_GRAIN)]
    return {"sums": len(grains), "lane_tails": tuple(g % CPU_LANES for g in grains)}


# ------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One op on one device at one shape; ``expect``: what its branch rule must give."""

    op: str  # adm_pool | cosine | feature_mse
    device: str  # cpu | cuda
    shape: tuple
    dtype: torch.dtype
    nhwc: bool = False
    # how the inputs are held: "" dense; "odd" / "odd-t": odd-offset views of both inputs / of feat_t
    # only (dense but not 16-byte aligned); "slice": x[..., 1:] of a wider map (not dense)
    view: str = ""
    branch: str = ""  # the path it covers, in words
    expect: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        dims = "x".join(map(str, self.shape))
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.device}-{self.op}-{dims}-{dtype}-{'nhwc' if self.nhwc else 'nchw'}" + (
            f"-{self.view}" if self.view else "")

    def facts(self) -> dict:
        s_aligned, t_aligned = self.view != "odd", self.view not in ("odd", "odd-t")
        # a slice is not dense: dense_feature copies it to a contiguous (NCHW) tensor
        nhwc = self.nhwc and self.view != "slice"
        if self.device == "cpu":
            if self.op == "adm_pool":
                return cpu_adm_pool_branch(nhwc, self.shape, CPU_THREADS)
            if self.op == "cosine":
                return cpu_cosine_branch(nhwc, self.shape)
            return cpu_feature_mse_branch(_numel(self.shape), CPU_THREADS)
        if self.op == "adm_pool":
            return cuda_adm_pool_branch(self.dtype, nhwc, self.shape, s_aligned, t_aligned)
        if self.op == "cosine":
            return cuda_cosine_branch(self.dtype, nhwc, self.shape, s_aligned, t_aligned)
        return cuda_feature_mse_branch(self.dtype, _numel(self.shape), s_aligned, t_aligned)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


IMAGENET_LAST = (256, 512, 7, 7)  # ResNet-18/34 last stage at B=256
IMAGENET_STAGE3 = (256, 256, 14, 14)  # ResNet-18/34 stage 3 at B=256
IMAGENET_STAGE1 = (256, 64, 56, 56)  # ResNet-18/34 stage 1 at B=256 (ADM's L_feat)
SEGMENTATION = (8, 512, 64, 128)  # a segmentation map: few images, many pixels
RESNET50_LAST = (256, 2048, 7, 7)

CASES = [
    # ------------------------------------------------------------------ adm_pool, CUDA
    Case("adm_pool", "cuda", IMAGENET_LAST, F32, branch="staged tiles of 10 px, 2 tiles per chunk, short last tile; "
         "element-wise row copies (HW % 4 != 0); one channel per thread (C >= 256); vectorised backward whose "
         "vectors wrap channel rows",
         expect={"cached": True, "tile": 10, "tiles_per_chunk": 2, "last_tile": 9, "vectorised": False,
                 "channel_groups": 1, "backward_vectorised": (True, True)}),
    Case("adm_pool", "cuda", IMAGENET_LAST, F32, nhwc=True, branch="NHWC 16-byte tile loads, 2 tiles per chunk",
         expect={"cached": True, "tile": 10, "tiles_per_chunk": 2, "vectorised": True}),
    Case("adm_pool", "cuda", IMAGENET_LAST, BF16, nhwc=True, branch="what bf16 training runs: NHWC 16-byte loads, "
         "17-px tiles (32 pixel slots), one tile per chunk",
         expect={"cached": True, "tile": 17, "tiles_per_chunk": 1, "vectorised": True}),
    Case("adm_pool", "cuda", IMAGENET_STAGE3, BF16, nhwc=True, branch="33-px tiles (64 pixel slots), 2 per chunk",
         expect={"cached": True, "tile": 33, "tiles_per_chunk": 2, "last_tile": 31, "vectorised": True}),
    Case("adm_pool", "cuda", IMAGENET_STAGE3, F16, branch="fp16 NCHW, element-wise row copies (HW % 8 != 0)",
         expect={"cached": True, "tiles_per_chunk": 2, "vectorised": False, "backward_vectorised": (True, True)}),
    Case("adm_pool", "cuda", SEGMENTATION, F32, branch="16-byte NCHW row copies, 8-px tiles, 8 tiles per chunk, "
         "128 chunks per image",
         expect={"cached": True, "tile": 8, "tiles_per_chunk": 8, "chunks": 128, "vectorised": True}),
    Case("adm_pool", "cuda", SEGMENTATION, BF16, nhwc=True, branch="4 tiles per chunk, a 2-px last tile",
         expect={"cached": True, "tile": 21, "tiles_per_chunk": 4, "last_tile": 2, "vectorised": True}),
    Case("adm_pool", "cuda", SEGMENTATION, F16, branch="fp16 16-byte NCHW row copies, 4 tiles per chunk",
         expect={"cached": True, "tile": 16, "tiles_per_chunk": 4, "vectorised": True}),
    Case("adm_pool", "cuda", RESNET50_LAST, F32, branch="2048 channels: 1-px tiles (256 channel groups per pixel), "
         "13 tiles per chunk",
         expect={"cached": True, "tile": 1, "tiles_per_chunk": 13, "vectorised": False}),
    Case("adm_pool", "cuda", RESNET50_LAST, BF16, nhwc=True, branch="2048 channels NHWC: 5-px tiles, 3 per chunk",
         expect={"cached": True, "tile": 5, "tiles_per_chunk": 3, "vectorised": True}),
    Case("adm_pool", "cuda", (32, 4096, 7, 7), F32, branch="4096 channels: 1-px staged tiles, 2 per chunk",
         expect={"cached": True, "tile": 1, "tiles_per_chunk": 2}),
    Case("adm_pool", "cuda", (4, 4096, 7, 7), F64, branch="beyond the shared-memory budget (fp64): tiles read from "
         "global memory twice, 25-px NCHW tiles",
         expect={"cached": False, "tile": 25, "vectorised": False}),
    Case("adm_pool", "cuda", (4, 8192, 7, 7), F32, branch="beyond the shared-memory budget (fp32 NCHW)",
         expect={"cached": False, "tile": 25, "vectorised": False}),
    Case("adm_pool", "cuda", (16, 6144, 24, 24), F32, nhwc=True, branch="beyond the shared-memory budget, NHWC: "
         "8-px global tiles, 2 per chunk",
         expect={"cached": False, "tile": 8, "tiles_per_chunk": 2, "vectorised": False}),
    Case("adm_pool", "cuda", (128, 64, 8, 8), BF16, nhwc=True, branch="CIFAR last stage (C=64): the tile's pixels "
         "split over 4 thread groups",
         expect={"cached": True, "tile": 64, "channel_groups": 4, "vectorised": True}),
    Case("adm_pool", "cuda", (8, 256, 32, 64), F32, view="odd", branch="odd-offset views: the element-wise "
         "staged path where aligned inputs would take 16-byte rows; element-wise backward",
         expect={"cached": True, "vectorised": False, "backward_vectorised": (False, False)}),
    Case("adm_pool", "cuda", IMAGENET_LAST, BF16, nhwc=True, view="odd", branch="odd-offset NHWC views: "
         "element-wise tile loads and backward",
         expect={"cached": True, "vectorised": False, "backward_vectorised": (False, False)}),
    Case("adm_pool", "cuda", IMAGENET_LAST, F32, nhwc=True, view="odd-t", branch="only feat_t misaligned: "
         "element-wise forward; vectorised backward of feat_s, element-wise of feat_t",
         expect={"vectorised": False, "backward_vectorised": (True, False)}),
    Case("adm_pool", "cuda", IMAGENET_LAST, BF16, nhwc=True, view="slice", branch="a channels_last slice "
         "x[..., 1:]: copied to contiguous NCHW (dense_feature), then NCHW element-wise row copies",
         expect={"cached": True, "tile": 17, "vectorised": False, "backward_vectorised": (True, True)}),
    # ------------------------------------------------------------------ cosine_similarity_map, CUDA
    Case("cosine", "cuda", IMAGENET_LAST, F32, branch="one 64-slot tile of 49 px per image; vectorised backward "
         "whose vectors wrap channel rows",
         expect={"pm": 64, "tiles": 1, "last_tile": 49, "backward_vectorised": True, "vector_wraps": True}),
    Case("cosine", "cuda", IMAGENET_LAST, BF16, nhwc=True, branch="NHWC 8-px tiles, a 1-px last tile",
         expect={"pm": 8, "tiles": 7, "last_tile": 1, "backward_vectorised": True, "vector_wraps": False}),
    Case("cosine", "cuda", SEGMENTATION, F32, nhwc=True, branch="1024 tiles per image",
         expect={"pm": 8, "tiles": 1024, "backward_vectorised": True}),
    Case("cosine", "cuda", SEGMENTATION, F16, branch="fp16 NCHW, 128 tiles per image",
         expect={"pm": 64, "tiles": 128, "backward_vectorised": True}),
    Case("cosine", "cuda", (8, 4096, 7, 7), F32, branch="4096 channels: 1024 per thread group",
         expect={"pm": 64, "backward_vectorised": True}),
    Case("cosine", "cuda", (64, 300, 7, 7), BF16, nhwc=True, branch="C % 8 != 0: backward vectors span two pixels",
         expect={"pm": 8, "backward_vectorised": True, "vector_wraps": True}),
    Case("cosine", "cuda", (256, 512, 2, 2), F32, nhwc=True, branch="HW < tile: 4 pixel slots, 2 warps per pixel",
         expect={"pm": 4, "tiles": 1}),
    Case("cosine", "cuda", (8, 256, 32, 64), F32, view="odd", branch="odd-offset views: element-wise backward",
         expect={"backward_vectorised": False}),
    Case("cosine", "cuda", IMAGENET_LAST, BF16, nhwc=True, view="odd-t", branch="feat_t misaligned: element-wise "
         "NHWC backward",
         expect={"backward_vectorised": False}),
    # ------------------------------------------------------------------ feature_mse, CUDA
    Case("feature_mse", "cuda", IMAGENET_STAGE1, BF16, nhwc=True, branch="51M elements: 1024 partial sums, "
         "grid-stride passes, vectorised",
         expect={"vectorised": True, "blocks": 1024, "forward_passes": 25}),
    Case("feature_mse", "cuda", SEGMENTATION, F32, branch="33M elements vectorised",
         expect={"vectorised": True, "blocks": 1024, "forward_passes": 32, "backward_passes": 1}),
    Case("feature_mse", "cuda", SEGMENTATION, F32, view="odd", branch="odd-offset views: element-wise, "
         "a grid-stride backward (more than 65536 blocks' worth)",
         expect={"vectorised": False, "forward_passes": 128, "backward_passes": 2}),
    Case("feature_mse", "cuda", (7, 511, 7, 7), BF16, branch="N % 8 != 0: element-wise",
         expect={"vectorised": False, "blocks": 11}),
    Case("feature_mse", "cuda", (1_000_003,), F16, view="odd-t", branch="any rank: a 1-D odd-offset view",
         expect={"vectorised": False}),
    # ------------------------------------------------------------------ CPU (2 threads)
    Case("adm_pool", "cpu", (2, 32, 41, 41), F32, branch="4 chunks of 7 tiles of 64 px, a 17-px last tile "
         "(8-lane rows with a scalar tail)",
         expect={"chunks": 4, "tiles_per_chunk": 7, "last_tile": 17, "lane_tail": 1}),
    Case("adm_pool", "cpu", (2, 32, 41, 41), F32, nhwc=True, branch="NHWC chunks of 7 tiles, 32 channel lanes",
         expect={"chunks": 4, "tiles_per_chunk": 7, "lane_tail": 0}),
    Case("adm_pool", "cpu", (2, 32, 41, 41), BF16, nhwc=True, branch="bf16 NHWC, chunks of 7 tiles",
         expect={"chunks": 4, "tiles_per_chunk": 7}),
    Case("adm_pool", "cpu", (2, 300, 9, 9), F16, nhwc=True, branch="C=300: 9 channel lanes and a 12-channel tail",
         expect={"lane_tail": 12}),
    Case("adm_pool", "cpu", (2, 2048, 7, 7), F32, branch="2048 channels NCHW", expect={"tiles_per_chunk": 1}),
    Case("adm_pool", "cpu", (2, 2048, 7, 7), BF16, nhwc=True, branch="2048 channels NHWC", expect={"lane_tail": 0}),
    Case("adm_pool", "cpu", (2, 64, 9, 9), F32, view="odd", branch="odd-offset views, read in place"),
    Case("adm_pool", "cpu", (2, 64, 9, 9), BF16, nhwc=True, view="odd-t", branch="odd-offset NHWC feat_t"),
    Case("adm_pool", "cpu", (2, 32, 41, 41), F32, nhwc=True, view="slice", branch="a channels_last slice "
         "x[..., 1:]: copied to contiguous NCHW (dense_feature), then the NCHW rows",
         expect={"tiles_per_chunk": 7, "lane_tail": 1}),
    Case("adm_pool", "cpu", (2, 64, 9, 9), F64, nhwc=True, branch="fp64"),
    Case("cosine", "cpu", (2, 32, 41, 41), F32, branch="27 tiles per image, a 17-px last tile",
         expect={"tiles": 27, "last_tile": 17}),
    Case("cosine", "cpu", (2, 32, 41, 41), BF16, nhwc=True, branch="bf16 NHWC tiles", expect={"tiles": 27}),
    Case("cosine", "cpu", (2, 300, 9, 9), F16, nhwc=True, branch="C=300: a 12-channel lane tail",
         expect={"lane_tail": 12}),
    Case("cosine", "cpu", (2, 64, 9, 9), F32, nhwc=True, view="odd", branch="odd-offset views"),
    Case("feature_mse", "cpu", (3, 77, 13, 29), F32, branch="2 threads x 2 grains, lane tails of 24 and 23",
         expect={"sums": 4, "lane_tails": (0, 24, 0, 23)}),
    Case("feature_mse", "cpu", (3, 77, 13, 29), BF16, branch="bf16, 2 threads x 2 grains", expect={"sums": 4}),
    Case("feature_mse", "cpu", (100_001,), F16, view="odd", branch="a 1-D odd-offset view",
         expect={"sums": 4}),
]


def _params(op: str):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.cuda] if c.device == "cuda" else []) for c in CASES
            if c.op == op]


# ------------------------------------------------------------------------------------------ inputs


def odd_offset(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in a view one element into its storage, in ``x``'s layout: dense (the kernels
    read it in place), but not 16-byte aligned."""
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    if x.dim() == 4 and not x.is_contiguous():  # channels_last
        B, C, H, W = x.shape
        view = storage[1:].view(B, H, W, C).permute(0, 3, 1, 2)
    else:
        view = storage[1:].view(x.shape)
    view.copy_(x)
    assert view.data_ptr() % VEC_BYTES != 0 and view.stride() == x.stride()
    return view


def features(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A student / teacher pair whose per-pixel cosines spread over (-1, 1), in the case's dtype,
    layout and alignment, made on its device."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    s = torch.randn(case.shape, generator=gen, device=case.device)
    noise = torch.randn(case.shape, generator=gen, device=case.device)
    if len(case.shape) == 4:
        B, _, H, W = case.shape
        cos = torch.rand(B, 1, H, W, generator=gen, device=case.device) * 2 - 1  # the cosine each pixel gets
        t = cos * s + (1 - cos * cos).sqrt() * noise
    else:
        t = 0.5 * s + noise
    fmt = torch.channels_last if case.nhwc else torch.contiguous_format
    s, t = (x.to(case.dtype).contiguous(memory_format=fmt) for x in (s, t))
    if case.view == "slice":
        s, t = (torch.cat([x[..., :1], x], dim=-1).contiguous(memory_format=fmt)[..., 1:] for x in (s, t))
    if case.view == "odd":
        s = odd_offset(s)
    if case.view in ("odd", "odd-t"):
        t = odd_offset(t)
    return s, t


@contextmanager
def cpu_threads(n: int):
    """The CPU kernels split the pixels by the thread count: fix it for the branch a case claims."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_case(case: Case, fn, *args):
    require(case.device, case.device)
    if case.device == "cpu":
        with cpu_threads(CPU_THREADS):
            return fn(*args)
    return fn(*args)


def leaves(*xs):
    return [x.detach().requires_grad_() for x in xs]


def assert_parity(out: torch.Tensor, ref64: torch.Tensor, ref_lowp, what: str, rtol: float = 1e-5) -> None:
    """fp32 within ``rtol`` of fp64 (absolute: ``rtol`` x the largest value), fp64 within 1e-10;
    fp16 / bf16 by the low-precision rule against ``ref_lowp``, the reference in that dtype."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.dtype in (F16, BF16):
        assert_within_rule(out, ref_lowp, ref64, what)
        return
    tol = rtol if out.dtype == F32 else 1e-10
    torch.testing.assert_close(out.double(), ref64, rtol=tol, atol=tol * ref64.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def low_precision(dtype: torch.dtype) -> bool:
    return dtype in (F16, BF16)


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_each_case_selects_its_branch(case):
    facts = case.facts()
    assert {k: facts[k] for k in case.expect} == case.expect, f"{case.branch}: the kernels choose {facts}"


def _adm_pool(case: Case):
    s, t = features(case)
    B, C = case.shape[:2]
    gen = torch.Generator(device=case.device).manual_seed(1)
    w = torch.randn(2, B, C, generator=gen, device=case.device).to(case.dtype)  # incoming gradients

    def forward_backward(fn, s, t, w):
        a, b = leaves(s, t)
        ps, pt = fn(a, b)
        ((ps * w[0]).sum() + (pt * w[1]).sum()).backward()
        return [ps.detach(), pt.detach(), a.grad, b.grad]

    got = forward_backward(lambda a, b: adm_pool(a, b, impl=case.device), s, t, w)
    ref64 = forward_backward(adm_pool_reference, s.double(), t.double(), w.double())
    ref = forward_backward(adm_pool_reference, s, t, w) if low_precision(case.dtype) else [None] * 4
    for what, out, r64, r in zip(("pooled_s", "pooled_t", "grad_s", "grad_t"), got, ref64, ref):
        assert_parity(out, r64, r, f"{case.id} ({case.branch}) {what}")
    if case.nhwc and case.view != "slice":  # the gradient in the layout of its input
        assert got[2].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", _params("adm_pool"))
def test_adm_pool_forward_backward(case):
    run_case(case, _adm_pool, case)


def _cosine(case: Case):
    s, t = features(case)
    B, _, H, W = case.shape
    g = torch.randn(B, H, W, generator=torch.Generator(device=case.device).manual_seed(1),
                    device=case.device).to(case.dtype)

    def forward_backward(fn, s, t, g):
        a, b = leaves(s, t)
        out = fn(a, b)
        (out * g).sum().backward()
        return [out.detach(), a.grad, b.grad]

    got = forward_backward(lambda a, b: cosine_similarity_map(a, b, impl=case.device), s, t, g)
    ref64 = forward_backward(cosine_similarity_map_reference, s.double(), t.double(), g.double())
    ref = forward_backward(cosine_similarity_map_reference, s, t, g) if low_precision(case.dtype) else [None] * 3
    for what, out, r64, r, rtol in zip(("sim", "grad_s", "grad_t"), got, ref64, ref, (1e-5, 1e-4, 1e-4)):
        assert_parity(out, r64, r, f"{case.id} ({case.branch}) {what}", rtol)


@pytest.mark.parametrize("case", _params("cosine"))
def test_cosine_similarity_map_forward_backward(case):
    run_case(case, _cosine, case)


def _feature_mse(case: Case):
    s, t = features(case)
    g = torch.tensor(0.75, device=case.device).to(case.dtype)  # an incoming gradient other than 1

    def forward_backward(fn, s, t, g):
        (a,) = leaves(s)
        out = fn(a, t)
        (out * g).backward()
        return [out.detach(), a.grad]

    got = forward_backward(lambda a, b: feature_mse(a, b, impl=case.device), s, t, g)
    ref64 = forward_backward(feature_mse_reference, s.double(), t.double(), g.double())
    ref = forward_backward(feature_mse_reference, s, t, g) if low_precision(case.dtype) else [None] * 2
    for what, out, r64, r in zip(("mse", "grad_s"), got, ref64, ref):
        assert_parity(out, r64, r, f"{case.id} ({case.branch}) {what}")


@pytest.mark.parametrize("case", _params("feature_mse"))
def test_feature_mse_forward_backward(case):
    run_case(case, _feature_mse, case)
