"""Timing and provenance for benchmarks: per-call samples, percentiles, copy bandwidth, and the
machine/commit a result row belongs to."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def _percentile(sorted_values, q: float) -> float:
    idx = q * (len(sorted_values) - 1)
    lo, hi = int(idx), min(int(idx) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (idx - lo)


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events around it on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _summary(times: list) -> Timing:
    times = sorted(times)
    return Timing(_percentile(times, 0.5), _percentile(times, 0.2), _percentile(times, 0.8), len(times))


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeat: int = 10,
            setup: Callable[[], None] | None = None) -> Timing:
    """Time ``fn`` call by call; ``setup`` runs before each call, untimed (e.g. clearing .grad)."""
    return measure_interleaved({"fn": (fn, setup)}, device, warmup=warmup, repeat=repeat)["fn"]


def measure_interleaved(calls: dict, device: torch.device, *, warmup: int = 2,
                        repeat: int = 10) -> dict:
    """Time several ``name -> (fn, setup)`` calls in alternation, one call of each per round and
    the order rotated every round, so drift of a shared machine lands on all of them alike and
    their ratios stay meaningful. Returns ``name -> Timing``."""
    names = list(calls)
    for name in names:
        fn, setup = calls[name]
        for _ in range(warmup):
            if setup:
                setup()
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = {name: [] for name in names}
    for rnd in range(repeat):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            fn, setup = calls[name]
            if setup:
                setup()
            samples[name].append(_time_call(fn, device))
    return {name: _summary(times) for name, times in samples.items()}


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 256) -> float:
    """Measured device copy bandwidth (read + write bytes per second) of ``dst.copy_(src)``."""
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=2, repeat=10)
    return 2 * src.numel() * 4 / (timing.median_ms * 1e-3) / 1e9


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        # Appending results must not mark the next run dirty: benchmarks/results is left out.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device) -> dict:
    """Columns every result row carries."""
    from .._version import __version__

    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "kdengine_version": __version__,
        "torch_version": torch.__version__,
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        # the CPU kernels' output-buffer cache (csrc/ops/cpu/buffer_cache.h); 0 = off
        "cpu_buffer_cache_mb": int(os.environ.get("KDENGINE_CPU_BUFFER_CACHE_MB", "1024")),
    }
