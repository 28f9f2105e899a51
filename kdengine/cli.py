"""The `kdengine` command line. Thin: parsing and printing; the work lives in the package."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

REPO_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


def _cmd_info(args) -> int:
    import platform

    import torch
    from rich.console import Console
    from rich.table import Table

    from . import __version__, _extension

    table = Table(title="kdengine", show_header=False)
    table.add_row("kdengine", __version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    built = _extension.BUILD_INFO
    if _extension.LOAD_ERROR:
        table.add_row("extension", f"not loaded: {_extension.LOAD_ERROR} (ops use the reference)")
    else:
        table.add_row("extension", f"kdengine._C {built['version']} built against torch {built['torch_version']}")
        table.add_row("compiled backends", ", ".join(built["backends"]))
        if built["cuda_archs"]:
            table.add_row("CUDA archs", built["cuda_archs"])
    table.add_row("CPU threads", str(torch.get_num_threads()))
    if _extension.HAS_CPU_OPS:
        limit = os.environ.get("KDENGINE_CPU_BUFFER_CACHE_MB", "1024")
        held = _extension._C.cpu_buffer_cache_bytes() / 2**20
        table.add_row("CPU buffer cache", f"{held:.0f} of {limit} MiB held (KDENGINE_CPU_BUFFER_CACHE_MB)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            table.add_row(f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        table.add_row("CUDA devices", f"none (torch CUDA build: {torch.version.cuda or 'no'})")
    if _extension.HAS_TRITON:
        import triton

        table.add_row("triton", triton.__version__)
    else:
        table.add_row("triton", "not installed")
    table.add_row("ffcv", "installed" if importlib.util.find_spec("ffcv") else "not installed")
    Console().print(table)
    return 0


def _cmd_bench_ops(args) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .bench import ops as bench_ops

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    available = bench_ops.available_providers(device)
    providers = args.providers.split(",") if args.providers else available
    unknown = [p for p in providers if p not in available]
    if unknown:
        print(f"kdengine bench ops: providers {unknown} are not available on {device} "
              f"(available: {available})", file=sys.stderr)
        return 2
    config = bench_ops.BenchConfig(
        device=device,
        dtype=dtype,
        cases=args.cases.split(",") if args.cases else list(bench_ops.CASES),
        ops=args.ops.split(",") if args.ops else list(bench_ops.OPS),
        providers=providers,
        modes=args.modes.split(",") if args.modes else list(bench_ops.MODES),
        repeat=args.repeat,
        channels_last=args.channels_last,
        output=None if args.no_save else args.output,
    )
    for name, values, valid in (("cases", config.cases, bench_ops.CASES), ("ops", config.ops, bench_ops.OPS),
                                ("modes", config.modes, bench_ops.MODES)):
        bad = [v for v in values if v not in valid]
        if bad:
            print(f"kdengine bench ops: unknown {name} {bad}; valid: {list(valid)}", file=sys.stderr)
            return 2
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn()) as progress:
        rows = bench_ops.run(config, progress)
    table = Table(title=f"kdengine bench ops on {rows[0]['device_name']} ({rows[0]['dtype']}, "
                        f"copy bandwidth {rows[0]['copy_bw_gbps']} GB/s)")
    for col in ("case", "op", "mode", "provider", "median ms", "p20-p80", "GB/s", "% copy", "x eager", "x compile"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["case"], r["op"], r["mode"], r["provider"], f"{r['median_ms']:.3f}",
                      f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.0f}",
                      str(r["speedup_vs_eager"]), str(r["speedup_vs_compile"]))
    Console(width=max(160, Console().width)).print(table)  # full rows also when piped to a log
    if config.output:
        print(f"appended {len(rows)} rows to {config.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdengine",
        description="kdengine: knowledge distillation with fused kernels. "
                    "Commands available in this version: info, bench.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices, compiled backends, Triton and FFCV")
    info.set_defaults(func=_cmd_info)

    bench = sub.add_parser("bench", help="microbenchmarks against the baselines")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    bops = bench_sub.add_parser(
        "ops", help="ADM ops and ADMLoss: reference eager / torch.compile vs cpu, cuda, triton kernels",
        description="Times forward, backward and forward+backward of the ADM ops and the whole ADMLoss; "
                    "appends one row per measurement to benchmarks/results/ops.csv.",
    )
    bops.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bops.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on CUDA")
    bops.add_argument("--cases", help="comma-separated: imagenet_r34_r18, cifar_r32x4_r8x4, seg_512x64x128 (default: all)")
    bops.add_argument("--ops", help="comma-separated: adm_loss, adm_pool, feature_mse, cosine_similarity_map (default: all)")
    bops.add_argument("--providers", help="comma-separated: reference-eager, reference-compile, cpu, cuda, triton "
                                          "(default: all available)")
    bops.add_argument("--modes", help="comma-separated: fwd, bwd, fwdbwd (default: all)")
    bops.add_argument("--repeat", type=int, default=10, help="timed calls per measurement (default: 10)")
    bops.add_argument("--channels-last", action="store_true", help="features in channels_last")
    bops.add_argument("--output", default=os.path.join(REPO_RESULTS, "ops.csv"), help="CSV to append to")
    bops.add_argument("--no-save", action="store_true", help="print only, append nothing")
    bops.set_defaults(func=_cmd_bench_ops)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
