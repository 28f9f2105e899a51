"""Benchmark of the dense ADM ops (adm_maps, adm_region_pool, and both together as dense ADM's
pooling step) at the Cityscapes head shape, B=8 x 512 x 64 x 128 (DeepLabV3 on 512 x 1024 crops
at output stride 8), 19 classes, against their eager PyTorch references (and torch.compile of
them). Rows are appended to this repository's benchmarks/results/ops.csv in the long format of
``kdengine bench ops`` (case ``seg_dense_512x64x128``).

    python benchmarks/ops/bench_dense_adm.py                       # CPU: fp32, NCHW
    python benchmarks/ops/bench_dense_adm.py --device cuda         # bf16, channels_last
    python benchmarks/ops/bench_dense_adm.py --batch 2 --repeat 3 --no-save

Ops: ``adm_maps`` (forward only: the maps carry no gradient), ``adm_region_pool`` and
``adm_dense`` (maps, then the student's region pool with A_co and the teacher's with A_di).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from kdengine.bench.results import append_rows, bench_device, provenance
from kdengine.bench.timing import Timing, copy_bandwidth_gbps, measure_interleaved
from kdengine.ops import available_impls
from kdengine.ops.adm_maps import adm_maps
from kdengine.ops.adm_region_pool import adm_region_pool

RESULTS = Path(__file__).resolve().parents[1] / "results" / "ops.csv"
CASE = "seg_dense_512x64x128"
CHANNELS, HEIGHT, WIDTH, NUM_CLASSES, IGNORE = 512, 64, 128, 19, 255
OPS = ("adm_maps", "adm_region_pool", "adm_dense")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def label_map(batch: int, device) -> torch.Tensor:
    """Cityscapes-like labels on the feature grid: classes constant over 8 x 16 blocks (a few
    classes per row of pixels, as in street scenes), about 10 % ignored."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, NUM_CLASSES, (batch, HEIGHT // 8, WIDTH // 16), generator=gen)
    labels = blocks.repeat_interleave(8, dim=1).repeat_interleave(16, dim=2)
    labels[torch.rand(labels.shape, generator=gen) < 0.1] = IGNORE
    return labels.to(device)


def make_inputs(batch: int, dtype, device, channels_last: bool):
    gen = torch.Generator().manual_seed(1)
    shape = (batch, CHANNELS, HEIGHT, WIDTH)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    s = torch.randn(shape, generator=gen)
    t = 0.5 * s + 0.5 * torch.randn(shape, generator=gen)
    s, t = (x.to(device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_() for x in (s, t))
    labels = label_map(batch, device)
    return s, t, labels, labels != IGNORE


def loss_fn(op: str, impl: str, labels, valid):
    """A scalar function of (s, t) running ``op`` through ``impl``."""
    impl = "reference" if impl.startswith("reference") else impl
    if op == "adm_maps":
        def fn(s, t):
            co, di = adm_maps(s, t, valid, impl=impl)
            return co.sum() + di.sum()
    elif op == "adm_region_pool":
        attn = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)).to(labels.device)

        def fn(s, t):
            return adm_region_pool(s, attn, labels, NUM_CLASSES, IGNORE, impl=impl)[0].float().sum()
    else:
        def fn(s, t):
            co, di = adm_maps(s, t, valid, impl=impl)
            pooled_s, _ = adm_region_pool(s, co, labels, NUM_CLASSES, IGNORE, impl=impl)
            pooled_t, _ = adm_region_pool(t, di, labels, NUM_CLASSES, IGNORE, impl=impl)
            return pooled_s.float().sum() + pooled_t.float().sum()
    return fn


def bytes_moved(op: str, mode: str, feature_bytes: int) -> int:
    """Minimal memory traffic of the ops as they are: each reads its feature(s) once forward;
    backward reads the feature and writes its gradient."""
    fwd = {"adm_maps": 2, "adm_region_pool": 1, "adm_dense": 4}[op] * feature_bytes
    bwd = {"adm_maps": 0, "adm_region_pool": 2, "adm_dense": 4}[op] * feature_bytes
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def fit_to_file(path: Path, rows: list[dict]) -> list[dict]:
    """The rows in the column order of an existing CSV (columns it lacks are left out, columns
    the rows lack stay empty), so they append to a file written by an earlier version."""
    if not path.exists() or path.stat().st_size == 0:
        return rows
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    return [{k: r.get(k, "") for k in header} for r in rows] if header else rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", type=int, default=None, help="calls per timed sample (default: 20 CUDA, 1 CPU)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--providers", nargs="+", default=None,
                        help="reference-eager reference-compile cpu cuda triton (default: all available)")
    parser.add_argument("--modes", nargs="+", choices=("fwd", "bwd", "fwdbwd"), default=["fwd", "bwd", "fwdbwd"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on CUDA only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    device = bench_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    calls = args.calls or (20 if device.type == "cuda" else 1)
    impls = available_impls(device)
    providers = args.providers or ["reference-eager", "reference-compile"] + [i for i in impls if i != "reference"]
    s, t, labels, valid = make_inputs(args.batch, dtype, device, channels_last)
    feature_bytes = s.numel() * s.element_size()
    copy_bw = copy_bandwidth_gbps(device)
    base = {**provenance(device), "copy_bw_gbps": round(copy_bw, 2)}

    def clear():
        s.grad = t.grad = None

    rows = []
    for op in args.ops:
        fns = {}
        for provider in providers:
            fn = loss_fn(op, provider, labels, valid)
            fns[provider] = torch.compile(fn, dynamic=False) if provider == "reference-compile" else fn
        for mode in args.modes:
            if op == "adm_maps" and mode != "fwd":
                continue  # no gradient
            timed = {}
            for provider, fn in fns.items():
                if mode == "fwd":
                    def call(fn=fn):
                        with torch.no_grad():
                            for _ in range(calls):
                                fn(s, t)
                elif mode == "bwd":
                    def call(loss=fn(s, t)):
                        for _ in range(calls):
                            clear()
                            loss.backward(retain_graph=True)
                else:
                    def call(fn=fn):
                        for _ in range(calls):
                            clear()
                            fn(s, t).backward()
                timed[provider] = (call, clear)
            for provider, timing in measure_interleaved(timed, device, repeat=args.repeat).items():
                t_ms = Timing(timing.median_ms / calls, timing.p20_ms / calls, timing.p80_ms / calls, timing.samples)
                moved = bytes_moved(op, mode, feature_bytes)
                gbps = moved / (t_ms.median_ms * 1e-3) / 1e9
                rows.append({**base, "case": CASE, "op": op, "mode": mode, "provider": provider,
                             "dtype": str(dtype).replace("torch.", ""),
                             "layout": "channels_last" if channels_last else "contiguous", "batch": args.batch,
                             "stages": f"{CHANNELS}x{HEIGHT}x{WIDTH}", "median_ms": round(t_ms.median_ms, 4),
                             "p20_ms": round(t_ms.p20_ms, 4), "p80_ms": round(t_ms.p80_ms, 4),
                             "samples": t_ms.samples, "calls_per_sample": calls, "bytes_moved": moved,
                             "gbps": round(gbps, 2), "pct_copy_bw": round(100 * gbps / copy_bw, 1)})
            del timed
    index = {(r["op"], r["mode"], r["provider"]): r["median_ms"] for r in rows}
    for r in rows:
        for key, provider in (("speedup_vs_eager", "reference-eager"), ("speedup_vs_compile", "reference-compile")):
            ref = index.get((r["op"], r["mode"], provider))
            r[key] = round(ref / r["median_ms"], 3) if ref else ""
        print(f"{r['op']:16s} {r['mode']:7s} {r['provider']:18s} {r['median_ms']:10.3f} ms  "
              f"{r['gbps']:8.2f} GB/s  x{r['speedup_vs_eager']} vs eager")
    if not args.no_save:
        append_rows(args.output, fit_to_file(args.output, rows))
        print(f"appended {len(rows)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
