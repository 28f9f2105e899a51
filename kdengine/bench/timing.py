"""Timing for benchmarks: per-call samples, their percentiles, interleaved measurement of
several calls, and the device's copy bandwidth."""
from __future__ import annotations

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


def percentile(sorted_values, q: float) -> float:
    """A quantile, linearly interpolated (numpy's default method).

    Args:
        sorted_values: the values, ascending.
        q: the quantile, 0..1.

    Returns:
        The interpolated value.
    """
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
    return Timing(percentile(times, 0.5), percentile(times, 0.2), percentile(times, 0.8), len(times))


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeat: int = 10,
            setup: Callable[[], None] | None = None) -> Timing:
    """Time a call, call by call.

    Args:
        fn: the call to time.
        device: where it runs (CUDA events there, ``perf_counter`` on the CPU).
        warmup: untimed calls first.
        repeat: timed calls.
        setup: runs before each call, untimed (e.g. clearing ``.grad``).

    Returns:
        The :class:`Timing` of the timed calls.
    """
    return measure_interleaved({"fn": (fn, setup)}, device, warmup=warmup, repeat=repeat)["fn"]


def measure_interleaved(calls: dict, device: torch.device, *, warmup: int = 2,
                        repeat: int = 10) -> dict:
    """Time several calls in alternation, one call of each per round and the order rotated every
    round, so drift of a shared machine lands on all of them alike and their ratios stay
    meaningful.

    Args:
        calls: ``name -> (fn, setup)``, ``setup`` None or run untimed before each call of ``fn``.
        device, warmup, repeat: as for :func:`measure`.

    Returns:
        ``name -> Timing``.
    """
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
    """The device's copy bandwidth, measured.

    Args:
        device: the device.
        megabytes: the size of the copied tensor, in MiB.

    Returns:
        Read + written GB per second of ``dst.copy_(src)`` (median of ten).
    """
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=2, repeat=10)
    return 2 * src.numel() * 4 / (timing.median_ms * 1e-3) / 1e9
