"""Benchmark of raa_attention (PAT's region-aware attention) against what a user would otherwise
run: the authors' eager matmul-softmax-matmul (``reference-eager``), PyTorch's
``F.scaled_dot_product_attention`` on the same (q + pos, k + pos, v) views (``sdpa``), optionally
the reference under torch.compile (``reference-compile``, --compile), and the kdengine backends of
the device. Providers of one (case, mode) are timed interleaved (medians of rotated rounds), so a
shared machine's drift lands on all of them alike.

Rows go to benchmarks/results/ops.csv in its long format (one row per measurement, the file's
columns; --output elsewhere, --no-save nowhere).

    python benchmarks/ops/bench_raa_attention.py --no-save              # CPU: the PAT default case
    python benchmarks/ops/bench_raa_attention.py --device cuda --dtype bf16 --calls 20
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kdengine.bench.results import append_rows, provenance
from kdengine.bench.timing import Timing, copy_bandwidth_gbps, measure_interleaved
from kdengine.ops import available_impls, raa_attention, raa_attention_reference

RESULTS = Path(__file__).resolve().parents[1] / "results" / "ops.csv"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "bwd", "fwdbwd")
#: name -> (B, N, D, heads). PAT's RAA: 64 tokens (16 per stage), D = 512, 8 heads of 64.
CASES = {
    "pat_raa_b128": (128, 64, 512, 8),
    "pat_raa_b256_n256": (32, 256, 512, 4),
}


def sdpa(q, k, v, pos, heads):
    """The same attention through F.scaled_dot_product_attention (its default scale 1/sqrt(d))."""
    B, N, D = q.shape

    def split(x):
        return x.reshape(B, N, heads, D // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q + pos), split(k + pos), split(v))
    return out.transpose(1, 2).reshape(B, N, D)


def providers(device: torch.device, compile_reference: bool) -> dict:
    fns = {"reference-eager": raa_attention_reference, "sdpa": sdpa}
    if compile_reference:
        fns["reference-compile"] = torch.compile(raa_attention_reference, dynamic=False)
    for impl in ("cpu", "cuda", "triton"):
        if impl in available_impls(device):
            fns[impl] = lambda q, k, v, pos, heads, impl=impl: raa_attention(q, k, v, pos, heads, impl=impl)
    return fns


def bytes_moved(mode: str, B: int, N: int, D: int, heads: int, itemsize: int, acc_size: int = 4) -> int:
    """What the fused op must read and write at least once: forward q, k, v, pos in and out, lse;
    backward q, k, v, pos, grad_out and lse in, the four gradients out."""
    x, pos, lse = B * N * D * itemsize, N * D * itemsize, B * heads * N * acc_size
    fwd = 4 * x + pos + lse
    bwd = 4 * x + pos + lse + 3 * x + pos
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def measure_case(shape, dtype, device, fns: dict, modes, repeat: int, calls: int) -> dict:
    """``(provider, mode) -> Timing`` per call."""
    B, N, D, heads = shape
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
              for s in ((B, N, D), (B, N, D), (B, N, D), (N, D))]

    def clear():
        for x in leaves:
            x.grad = None

    def loss(fn):
        return fn(*leaves, heads).float().square().sum()

    timings = {}
    for mode in modes:
        timed = {}
        for name, fn in fns.items():
            if mode == "fwd":
                def call(fn=fn):
                    with torch.no_grad():
                        for _ in range(calls):
                            fn(*leaves, heads)
            elif mode == "bwd":  # the forward graph is built once, outside the timing
                def call(value=loss(fn)):
                    for _ in range(calls):
                        clear()
                        value.backward(retain_graph=True)
            else:
                def call(fn=fn):
                    for _ in range(calls):
                        clear()
                        loss(fn).backward()
            timed[name] = (call, clear)
        for name, t in measure_interleaved(timed, device, repeat=repeat).items():
            timings[(name, mode)] = Timing(t.median_ms / calls, t.p20_ms / calls, t.p80_ms / calls, t.samples)
        del timed
    return timings


def rows_for(case: str, shape, dtype, device, timings: dict, base: dict, copy_bw: float, calls: int) -> list:
    B, N, D, heads = shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for (provider, mode), t in timings.items():
        moved = bytes_moved(mode, B, N, D, heads, itemsize)
        gbps = moved / (t.median_ms * 1e-3) / 1e9
        rows.append({
            **base, "copy_bw_gbps": round(copy_bw, 2), "case": case, "op": "raa_attention", "mode": mode,
            "provider": provider, "dtype": str(dtype).replace("torch.", ""), "layout": "contiguous", "batch": B,
            "stages": f"{N}x{D};heads={heads}", "median_ms": round(t.median_ms, 4), "p20_ms": round(t.p20_ms, 4),
            "p80_ms": round(t.p80_ms, 4), "samples": t.samples, "calls_per_sample": calls, "bytes_moved": moved,
            "gbps": round(gbps, 2), "pct_copy_bw": round(100 * gbps / copy_bw, 1),
        })
    medians = {(r["mode"], r["provider"]): r["median_ms"] for r in rows}
    for r in rows:
        for key, provider in (("speedup_vs_eager", "reference-eager"), ("speedup_vs_compile", "reference-compile"),
                              ("speedup_vs_sdpa", "sdpa")):
            ref = medians.get((r["mode"], provider))
            r[key] = round(ref / r["median_ms"], 3) if ref else ""
    return rows


def in_file_format(path: Path, rows: list) -> list:
    """The rows with exactly the columns of an existing CSV (missing ones empty; the
    speedup_vs_sdpa column only where the file has it), so they append to it."""
    if not path.exists() or path.stat().st_size == 0:
        return rows
    with open(path, newline="") as f:
        header = next(csv.reader(f), None) or []
    return [{key: r.get(key, "") for key in header} for r in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["pat_raa_b128"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeat", type=int, default=15, help="timed rounds (interleaved)")
    parser.add_argument("--calls", type=int, default=None, help="calls per timed sample (default: 20 CUDA, 1 CPU)")
    parser.add_argument("--compile", action="store_true", help="also time the reference under torch.compile")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    calls = args.calls or (20 if device.type == "cuda" else 1)
    fns = providers(device, args.compile)
    base = provenance(device)
    copy_bw = copy_bandwidth_gbps(device)
    all_rows = []
    for case in args.cases:
        shape = CASES[case]
        timings = measure_case(shape, dtype, device, fns, args.modes, args.repeat, calls)
        rows = rows_for(case, shape, dtype, device, timings, base, copy_bw, calls)
        all_rows.extend(rows)
        print(f"{case} B, N, D, heads = {shape}, {str(dtype).replace('torch.', '')}, {device}, "
              f"{torch.get_num_threads()} threads (median ms per call; speed-up vs eager / vs sdpa)")
        for r in rows:
            print(f"  {r['mode']:7s} {r['provider']:18s} {r['median_ms']:9.3f}  "
                  f"p20-p80 {r['p20_ms']:.3f}-{r['p80_ms']:.3f}  x{r['speedup_vs_eager']}  x{r['speedup_vs_sdpa']}")
    if not args.no_save:
        append_rows(args.output, in_file_format(args.output, all_rows))
        print(f"appended {len(all_rows)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
