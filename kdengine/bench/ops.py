"""`kdengine bench ops`: the ADM operators and the whole ADMLoss against the baselines a user
would otherwise run (Algorithm 1 in eager PyTorch, and its torch.compile), per backend.

Rows go to benchmarks/results/ops.csv (long format, one row per measurement)."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .. import ops
from ..losses import ADMLoss
from .timing import copy_bandwidth_gbps, measure_interleaved, provenance

PROVIDERS = ("reference-eager", "reference-compile", "cpu", "cuda", "triton")
MODES = ("fwd", "bwd", "fwdbwd")
OPS = ("adm_loss", "adm_pool", "feature_mse", "cosine_similarity_map")


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
            ps, pt = ops.adm_pool(fs[0], ft[0], impl=impl_arg)
            return ps.float().sum() + pt.float().sum()
        return fn
    if op == "feature_mse":
        return lambda fs, ft: ops.feature_mse(fs[0], ft[0], impl=impl_arg)
    return lambda fs, ft: ops.cosine_similarity_map(fs[0], ft[0], impl=impl_arg).float().sum()


def available_providers(device: torch.device) -> list[str]:
    impls = ops.available_impls(device)
    providers = ["reference-eager", "reference-compile"]
    return providers + [p for p in ("cpu", "cuda", "triton") if p in impls]


@dataclass
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    cases: list
    ops: list
    providers: list
    modes: list
    repeat: int = 10
    channels_last: bool = False
    output: Optional[str] = None


def run(config: BenchConfig, progress=None) -> list[dict]:
    """Measure every (case, op, provider, mode), providers interleaved; returns the rows (also
    appended to ``output``)."""
    device = config.device
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    base = provenance(device)
    copy_bw = copy_bandwidth_gbps(device)
    base["copy_bw_gbps"] = round(copy_bw, 2)
    rows = []
    work = [(c, o) for c in config.cases for o in config.ops
            if not (o == "adm_loss" and len(CASES[c].stages) == 1)]
    task = progress.add_task("bench ops", total=len(work) * len(config.modes)) if progress else None
    for case_name, op in work:
        case = CASES[case_name]
        feats_s, feats_t = _make_inputs(case, op, config.dtype, device, layout)
        leaves = feats_s + feats_t

        def clear():
            for x in leaves:
                x.grad = None

        fns = {}
        for provider in config.providers:
            fn = _loss_fn(op, provider, case, config.dtype, device)
            fns[provider] = torch.compile(fn, dynamic=False) if provider == "reference-compile" else fn
        timings = {}
        for mode in config.modes:
            if progress:
                progress.update(task, description=f"{case_name} {op} {mode}")
            calls, graphs = {}, {}
            for provider, fn in fns.items():
                if mode == "fwd":
                    calls[provider] = (lambda fn=fn: fn(feats_s, feats_t), clear)
                elif mode == "bwd":  # the forward graph is built once, outside the timing
                    graphs[provider] = fn(feats_s, feats_t)
                    calls[provider] = (lambda loss=graphs[provider]: loss.backward(retain_graph=True), clear)
                else:
                    calls[provider] = (lambda fn=fn: fn(feats_s, feats_t).backward(), clear)
            for provider, timing in measure_interleaved(calls, device, repeat=config.repeat).items():
                timings[(provider, mode)] = timing
            graphs.clear()
            if progress:
                progress.advance(task)
        for (provider, mode), t in timings.items():
            moved = _bytes_moved(op, mode, case, itemsize)
            gbps = moved / (t.median_ms * 1e-3) / 1e9
            rows.append({
                **base,
                "case": case_name,
                "op": op,
                "mode": mode,
                "provider": provider,
                "dtype": str(config.dtype).replace("torch.", ""),
                "layout": "channels_last" if config.channels_last else "contiguous",
                "batch": case.batch,
                "stages": ";".join("x".join(map(str, s)) for s in (case.stages if op == "adm_loss" else case.stages[-1:])),
                "median_ms": round(t.median_ms, 4),
                "p20_ms": round(t.p20_ms, 4),
                "p80_ms": round(t.p80_ms, 4),
                "samples": t.samples,
                "bytes_moved": moved,
                "gbps": round(gbps, 2),
                "pct_copy_bw": round(100 * gbps / copy_bw, 1),
            })
        del feats_s, feats_t, leaves, fns
    _add_speedups(rows)
    if config.output:
        append_rows(config.output, rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager / speedup_vs_compile: the reference providers' median over this row's."""
    index = {(r["case"], r["op"], r["mode"], r["provider"]): r["median_ms"] for r in rows}
    for r in rows:
        for key, provider in (("speedup_vs_eager", "reference-eager"), ("speedup_vs_compile", "reference-compile")):
            ref = index.get((r["case"], r["op"], r["mode"], provider))
            r[key] = round(ref / r["median_ms"], 3) if ref else ""


def append_rows(path: str, rows: list[dict]) -> None:
    """Append to a long-format CSV, writing the header when the file is new."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    fields = list(rows[0].keys())
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header and header != fields:
            raise ValueError(f"{path} has columns {header}, these rows have {fields}; use a new file")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
