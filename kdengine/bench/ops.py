"""`kdengine bench ops`: the ADM operators and the whole ADMLoss against the baselines a user
would otherwise run (Algorithm 1 in eager PyTorch, and its torch.compile), per backend.

Rows are appended to ``config.output`` (long format, one row per measurement); the command
line's default is ``./kdengine-bench/ops.csv`` (:func:`kdengine.bench.results.default_output`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import SettingError
from ..losses import ADMLoss
from ..ops import adm_pool, available_impls, cosine_similarity_map, feature_mse
from .results import append_rows, bench_device, provenance
from .timing import Timing, copy_bandwidth_gbps, measure_interleaved

PROVIDERS = ("reference-eager", "reference-compile", "cpu", "cuda", "triton")
MODES = ("fwd", "bwd", "fwdbwd")
OPS = ("adm_loss", "adm_pool", "feature_mse", "cosine_similarity_map")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    stages: tuple  # (channels, height, width) per stage, same for student and teacher
    num_classes: int


CASES = {
    # ResNet-34 -> ResNet-18 on ImageNet at 224 px: the four stage outputs.
    "imagenet_r34_r18": Case("imagenet_r34_r18", 256, ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)), 1000),
    # resnet32x4 -> resnet8x4 on CIFAR-100: the last stage.
    "cifar_r32x4_r8x4": Case("cifar_r32x4_r8x4", 128, ((256, 8, 8),), 100),
    # A segmentation-like map (e.g. DeepLabV3 R18 at 512x1024 / 8).
    "seg_512x64x128": Case("seg_512x64x128", 8, ((512, 64, 128),), 19),
}


def _bytes_moved(op: str, mode: str, case: Case, itemsize: int) -> int:
    """Minimal memory traffic of the fused op: what it must read and write at least once."""
    maps = [case.batch * c * h * w * itemsize for c, h, w in case.stages]
    last = maps[-1]
    per_op = {
        # forward reads s, t; backward reads feat and writes its gradient, for s and t
        "adm_pool": {"fwd": 2 * last, "bwd": 4 * last},
        # forward reads s, t; backward reads s, t and writes grad_s
        "feature_mse": {"fwd": 2 * last, "bwd": 3 * last},
        # forward reads s, t; backward reads s, t and writes both gradients
        "cosine_similarity_map": {"fwd": 2 * last, "bwd": 4 * last},
    }
    if op == "adm_loss":
        feat = sum(maps[1:])
        fwd, bwd = 2 * last + 2 * feat, 4 * last + 3 * feat
    else:
        fwd, bwd = per_op[op]["fwd"], per_op[op]["bwd"]
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def _make_inputs(case: Case, op: str, dtype, device, layout):
    stages = case.stages if op == "adm_loss" else case.stages[-1:]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def feature(c, h, w):
        x = torch.randn(case.batch, c, h, w, generator=gen).to(device=device, dtype=dtype)
        return x.contiguous(memory_format=layout).requires_grad_()

    feats_s = [feature(*s) for s in stages]
    feats_t = [(0.5 * f.detach() + 0.5 * feature(*s).detach()).requires_grad_() for f, s in zip(feats_s, stages)]
    return feats_s, feats_t


def _loss_fn(op: str, impl: str, case: Case, dtype, device) -> Callable:
    """A scalar-valued function of (feats_s, feats_t) that exercises ``op`` through ``impl``."""
    impl_arg = "reference" if impl.startswith("reference") else impl
    if op == "adm_loss":
        channels = case.stages[-1][0]
        head_s = nn.Linear(channels, case.num_classes).to(device=device, dtype=dtype)
        head_t = nn.Linear(channels, case.num_classes).to(device=device, dtype=dtype)
        # ImageNet ADM weights (paper Sec. 5.1)
        loss = ADMLoss(head_s, head_t, 0.2, 0.6, 0.01, impl=impl_arg)
        target = torch.randint(0, case.num_classes, (case.batch,), device=device)
        return lambda fs, ft: loss(fs, ft, target)
    if op == "adm_pool":
        def fn(fs, ft):
            ps, pt = adm_pool(fs[0], ft[0], impl=impl_arg)
            return ps.float().sum() + pt.float().sum()
        return fn
    if op == "feature_mse":
        return lambda fs, ft: feature_mse(fs[0], ft[0], impl=impl_arg)
    return lambda fs, ft: cosine_similarity_map(fs[0], ft[0], impl=impl_arg).float().sum()


def available_providers(device: torch.device) -> list[str]:
    """The providers that can run on a device.

    Args:
        device: the device.

    Returns:
        The names from :data:`PROVIDERS`: the two references always, the compiled and Triton
        kernels where built and usable.
    """
    impls = available_impls(device)
    return [p for p in PROVIDERS if p.startswith("reference") or p in impls]


@dataclass
class BenchConfig:
    """A checked benchmark selection; build it with :func:`make_config`."""

    device: torch.device
    dtype: torch.dtype
    cases: list
    ops: list
    providers: list
    modes: list
    repeat: int = 10
    channels_last: bool = False
    output: Optional[Path] = None  # None: append nowhere
    batches: Optional[list] = None  # batch sizes to run each case at (None: each case's own)
    calls: int = 1  # back-to-back calls inside one timed sample


def make_config(*, device: Optional[str] = None, dtype: Optional[str] = None, cases: Optional[Sequence[str]] = None,
                ops: Optional[Sequence[str]] = None, providers: Optional[Sequence[str]] = None,
                modes: Optional[Sequence[str]] = None, repeat: int = 10, channels_last: Optional[bool] = None,
                output=None, batches: Optional[Sequence[int]] = None, calls: Optional[int] = None) -> BenchConfig:
    """Check a selection by name and fill in the defaults.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (default: CUDA when available).
        dtype: a key of :data:`DTYPES` (default: ``"bf16"`` on CUDA, ``"fp32"`` on the CPU).
        cases: names from :data:`CASES` (default: all).
        ops: names from :data:`OPS` (default: all).
        providers: names from :data:`PROVIDERS` (default: all available on the device).
        modes: names from :data:`MODES` (default: all).
        repeat: timed samples per measurement, at least 1.
        channels_last: features in channels_last memory (default: on CUDA, the layout training
            uses there; NCHW on the CPU).
        output: the CSV to append to, or None for none.
        batches: batch sizes to run every case at (default: each case's own).
        calls: back-to-back calls inside one timed sample (default: 20 on CUDA, where one call
            of a small op is shorter than a launch and its synchronisation; 1 on the CPU).

    Returns:
        The :class:`BenchConfig`.

    Raises:
        SettingError: an unknown name, a provider not available on the device, or ``repeat < 1``.
    """
    dev = bench_device(device)
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise SettingError("dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
    available = available_providers(dev)
    selection = {}
    for name, values, valid in (("cases", cases, tuple(CASES)), ("ops", ops, OPS),
                                ("providers", providers, PROVIDERS), ("modes", modes, MODES)):
        values = list(values) if values else list(available if name == "providers" else valid)
        unknown = [v for v in values if v not in valid]
        if unknown:
            raise SettingError(name, f"has unknown names {unknown}; valid: {list(valid)}")
        selection[name] = values
    missing = [p for p in selection["providers"] if p not in available]
    if missing:
        raise SettingError("providers", f"{missing} are not available on {dev} (available: {available})")
    if repeat < 1:
        raise SettingError("repeat", f"must be at least 1, got {repeat}")
    if batches is not None and (not batches or any(int(b) < 1 for b in batches)):
        raise SettingError("batches", f"must be positive integers, got {list(batches)}")
    calls = calls if calls is not None else (20 if dev.type == "cuda" else 1)
    if calls < 1:
        raise SettingError("calls", f"must be at least 1, got {calls}")
    channels_last = dev.type == "cuda" if channels_last is None else bool(channels_last)
    return BenchConfig(device=dev, dtype=DTYPES[dtype], repeat=repeat, channels_last=channels_last,
                       output=Path(output) if output is not None else None,
                       batches=[int(b) for b in batches] if batches else None, calls=calls, **selection)


def run(config: BenchConfig, progress=None) -> list[dict]:
    """Measure every (case, op, provider, mode), the providers of one (case, op, mode) interleaved.

    Args:
        config: the selection (:func:`make_config`).
        progress: a ``rich.progress.Progress`` to report to, optional.

    Returns:
        The rows, also appended to ``config.output`` when set.
    """
    device = config.device
    copy_bw = copy_bandwidth_gbps(device)
    base = {**provenance(device), "copy_bw_gbps": round(copy_bw, 2)}
    work = [(c, o) for c in config.cases for o in config.ops
            if not (o == "adm_loss" and len(CASES[c].stages) == 1)]
    n_batches = len(config.batches) if config.batches else 1
    task = progress.add_task("bench ops", total=len(work) * len(config.modes) * n_batches) if progress else None
    rows = []
    for case_name, op in work:
        for batch in config.batches or [CASES[case_name].batch]:
            case = dataclasses.replace(CASES[case_name], batch=batch)
            timings = _measure_case(config, case, op, progress, task)
            rows.extend(_row(base, config, case, op, provider, mode, t, copy_bw)
                        for (provider, mode), t in timings.items())
    _add_speedups(rows)
    if config.output:
        append_rows(config.output, rows)
    return rows


def _measure_case(config: BenchConfig, case: Case, op: str, progress, task) -> dict:
    """``(provider, mode) -> Timing`` of one (case, op); the inputs live as long as this call."""
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    feats_s, feats_t = _make_inputs(case, op, config.dtype, config.device, layout)
    leaves = feats_s + feats_t

    def clear():
        for x in leaves:
            x.grad = None

    fns = {}
    for provider in config.providers:
        fn = _loss_fn(op, provider, case, config.dtype, config.device)
        fns[provider] = torch.compile(fn, dynamic=False) if provider == "reference-compile" else fn
    timings = {}
    for mode in config.modes:
        if progress:
            progress.update(task, description=f"{case.name} {op} {mode}")
        calls = {}
        n = config.calls
        for provider, fn in fns.items():
            # n back-to-back calls per timed sample: on a GPU one small call is shorter than the
            # launch plus the event synchronisation that would otherwise be measured.
            if mode == "fwd":
                def call(fn=fn):
                    for _ in range(n):
                        fn(feats_s, feats_t)
            elif mode == "bwd":  # the forward graph is built once, outside the timing
                def call(loss=fn(feats_s, feats_t)):
                    for _ in range(n):
                        clear()
                        loss.backward(retain_graph=True)
            else:
                def call(fn=fn):
                    for _ in range(n):
                        clear()
                        fn(feats_s, feats_t).backward()
            calls[provider] = (call, clear)
        for provider, timing in measure_interleaved(calls, config.device, repeat=config.repeat).items():
            timings[(provider, mode)] = Timing(timing.median_ms / n, timing.p20_ms / n, timing.p80_ms / n,
                                               timing.samples)
        del calls  # frees the bwd mode's graphs before the next mode
        if progress:
            progress.advance(task)
    return timings


def _row(base: dict, config: BenchConfig, case: Case, op: str, provider: str, mode: str, t, copy_bw: float) -> dict:
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    moved = _bytes_moved(op, mode, case, itemsize)
    gbps = moved / (t.median_ms * 1e-3) / 1e9
    stages = case.stages if op == "adm_loss" else case.stages[-1:]
    return {
        **base,
        "case": case.name,
        "op": op,
        "mode": mode,
        "provider": provider,
        "dtype": str(config.dtype).replace("torch.", ""),
        "layout": "channels_last" if config.channels_last else "contiguous",
        "batch": case.batch,
        "stages": ";".join("x".join(map(str, s)) for s in stages),
        "median_ms": round(t.median_ms, 4),
        "p20_ms": round(t.p20_ms, 4),
        "p80_ms": round(t.p80_ms, 4),
        "samples": t.samples,
        "calls_per_sample": config.calls,
        "bytes_moved": moved,
        "gbps": round(gbps, 2),
        "pct_copy_bw": round(100 * gbps / copy_bw, 1),
    }


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager / speedup_vs_compile: the reference providers' median over this row's."""
    index = {(r["case"], r["batch"], r["op"], r["mode"], r["provider"]): r["median_ms"] for r in rows}
    for r in rows:
        for key, provider in (("speedup_vs_eager", "reference-eager"), ("speedup_vs_compile", "reference-compile")):
            ref = index.get((r["case"], r["batch"], r["op"], r["mode"], provider))
            r[key] = round(ref / r["median_ms"], 3) if ref else ""
