"""The `kdengine` command line. Thin: parsing and printing; the work lives in the package."""
from __future__ import annotations

import argparse
import sys


def _flag(setting: str) -> str:
    """A library setting as its command-line flag: ``jpeg_quality`` -> ``--jpeg-quality``."""
    return "--" + setting.replace("_", "-")


def _error_text(exc: BaseException, args, positionals: tuple = ()) -> str:
    """A library error as the command line words it: a setting the command has as a flag is named
    by the flag; the data writers' hints name the flags that act on them."""
    from .data import OutputExistsError, UnreadableImageError
    from .errors import SettingError

    if isinstance(exc, SettingError) and exc.setting in vars(args) and exc.setting not in positionals:
        return f"{_flag(exc.setting)} {exc.problem}"
    if isinstance(exc, OutputExistsError):
        return f"{exc.path} exists; pass --overwrite to replace it"
    if isinstance(exc, UnreadableImageError):
        return (f"unreadable image {exc.path} ({exc.reason}); {len(exc.skipped)} in all; "
                "--on-error skip leaves them out")
    return str(exc)


# ------------------------------------------------------------------------------ kdengine info / bench


def _cmd_info(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .info import report

    table = Table(title="kdengine", show_header=False)
    for name, value in report():
        table.add_row(name, value)
    Console().print(table)
    return 0


def _csv_list(value):
    return value.split(",") if value else None


def _output(args, suite: str):
    """The CSV a bench run appends to: --output, else the library's default; None with --no-save."""
    from .bench.results import default_output

    return None if args.no_save else (args.output or default_output(suite))


def _cmd_bench_ops(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .bench import ops as bench_ops
    from .errors import SettingError

    try:
        config = bench_ops.make_config(
            device=args.device, dtype=args.dtype, cases=_csv_list(args.cases), ops=_csv_list(args.ops),
            providers=_csv_list(args.providers), modes=_csv_list(args.modes), repeat=args.repeat,
            channels_last=args.channels_last, output=_output(args, "ops"),
            batches=[int(b) for b in _csv_list(args.batches)] if args.batches else None, calls=args.calls)
    except SettingError as exc:
        print(f"kdengine bench ops: error: {_error_text(exc, args)}", file=sys.stderr)
        return 2
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn()) as progress:
        rows = bench_ops.run(config, progress)
    table = Table(title=f"kdengine bench ops on {rows[0]['device_name']} ({rows[0]['dtype']}, "
                        f"copy bandwidth {rows[0]['copy_bw_gbps']} GB/s)")
    for col in ("case", "B", "op", "mode", "provider", "median ms", "p20-p80", "GB/s", "% copy", "x eager",
                "x compile"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["case"], str(r["batch"]), r["op"], r["mode"], r["provider"], f"{r['median_ms']:.3f}",
                      f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.0f}",
                      str(r["speedup_vs_eager"]), str(r["speedup_vs_compile"]))
    Console(width=max(160, Console().width)).print(table)  # full rows also when piped to a log
    if config.output:
        print(f"appended {len(rows)} rows to {config.output}")
    return 0


def _cmd_bench_data(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .bench import data as bench_data

    try:
        config = bench_data.DataBenchConfig(
            num_images=args.num_images, workers=args.workers, batch_size=args.batch_size, epochs=args.epochs,
            write_mode=args.write_mode, cache_root=args.cache_root, output=_output(args, "data"))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn()) as progress:
            rows = bench_data.run(config, progress)
    except (ImportError, OSError, ValueError) as exc:
        print(f"kdengine bench data: error: {_error_text(exc, args)}", file=sys.stderr)
        return 1
    r0 = rows[0]
    table = Table(title=f"kdengine bench data: RandomResizedCrop {bench_data.RESOLUTION} + flip, "
                        f"{r0['num_images']} JPEGs ({r0['image_sizes']} px, q{r0['jpeg_quality']}, "
                        f"{r0['mean_jpeg_kb']} KB), {r0['workers']} workers, batch {r0['batch_size']}, "
                        f"{r0['cpu_cores']} cores ({r0['device_name']})")
    for col in ("loader", "implementation", "median img/s", "p20-p80", "min-max", "epoch s", "x baseline",
                "CPU ms/img", "x CPU eff."):
        table.add_column(col)
    for r in rows:
        table.add_row(r["loader"], r["implementation"], f"{r['median_img_s']:.0f}",
                      f"{r['p20_img_s']:.0f}-{r['p80_img_s']:.0f}", f"{r['min_img_s']:.0f}-{r['max_img_s']:.0f}",
                      f"{r['median_epoch_s']:.2f}", f"{r['speedup_vs_baseline']:.2f}", f"{r['cpu_ms_per_img']:.2f}",
                      f"{r['cpu_efficiency_vs_baseline']:.2f}")
    Console(width=max(140, Console().width)).print(table)
    print(f"both: {r0['output']} batches on the CPU; {r0['epochs']} timed epochs each after one warm-up; "
          f"commit {r0['commit']}, torch {r0['torch_version']}, ffcv {r0['ffcv_version']}; load average "
          f"{r0['loadavg_1m_start']} -> {r0['loadavg_1m_end']} on {r0['cpu_cores']} cores")
    if config.output:
        print(f"appended {len(rows)} rows to {config.output}")
    return 0


def _cmd_bench_step(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .bench import step as bench_step
    from .errors import SettingError

    try:
        config = bench_step.make_config(
            device=args.device, cases=_csv_list(args.cases), methods=_csv_list(args.methods),
            providers=_csv_list(args.providers), repeat=args.repeat, steps_per_window=args.steps_per_window,
            warmup=args.warmup, batch=args.batch, output=_output(args, "step"))
        if args.profile:
            bench_step.make_config(device=args.device, cases=[args.profile], methods=config.methods[:1])
    except SettingError as exc:
        print(f"kdengine bench step: error: {_error_text(exc, args)}", file=sys.stderr)
        return 2
    if args.profile:
        print(f"torch.profiler: the kdengine step of {args.profile} ({config.methods[0]}) on {config.device}")
        print(bench_step.profile_step(args.profile, config.methods[0], config.device))
        return 0
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn()) as progress:
        rows = bench_step.run(config, progress)
    r0 = rows[0]
    table = Table(title=f"kdengine bench step on {r0['device_name']} (torch {r0['torch_version']}, commit "
                        f"{r0['commit']}, {r0['threads']} threads)")
    for col in ("case", "method", "provider", "dtype/layout", "ms/step", "p20-p80", "img/s", "x fp32", "x bf16",
                "MFU %", "step MB"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["case"], r["method"], r["provider"], f"{r['dtype']}/{r['layout']}"
                      + (" graph" if r["cuda_graph"] else ""), f"{r['median_ms_per_step']:.1f}",
                      f"{r['p20_ms_per_step']:.1f}-{r['p80_ms_per_step']:.1f}", f"{r['img_per_s']:.0f}",
                      str(r["speedup_vs_eager_fp32"]), str(r["speedup_vs_eager_bf16"]), f"{r['mfu_pct']:.1f}",
                      str(r["step_peak_mem_mb"]))
    Console(width=max(160, Console().width)).print(table)
    if config.output:
        print(f"appended {len(rows)} rows to {config.output}")
    return 0


def _add_bench_parsers(sub) -> None:
    from .bench import ops as bench_ops
    from .bench.results import DEFAULT_DIR
    from .data import WRITE_MODES

    bench = sub.add_parser("bench", help="microbenchmarks against the baselines")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    bops = bench_sub.add_parser(
        "ops", help="ADM ops and ADMLoss: reference eager / torch.compile vs cpu, cuda, triton kernels",
        description="Times forward, backward and forward+backward of the ADM ops and the whole ADMLoss; "
                    f"appends one row per measurement to --output (default: {DEFAULT_DIR}/ops.csv in the "
                    "current directory).",
    )
    bops.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    bops.add_argument("--dtype", choices=list(bench_ops.DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    bops.add_argument("--cases", help=f"comma-separated: {', '.join(bench_ops.CASES)} (default: all)")
    bops.add_argument("--ops", help=f"comma-separated: {', '.join(bench_ops.OPS)} (default: all)")
    bops.add_argument("--providers", help=f"comma-separated: {', '.join(bench_ops.PROVIDERS)} "
                                          "(default: all available)")
    bops.add_argument("--modes", help=f"comma-separated: {', '.join(bench_ops.MODES)} (default: all)")
    bops.add_argument("--repeat", type=int, default=10, help="timed calls per measurement (default: 10)")
    bops.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                      help="features in channels_last (default: on CUDA, NCHW on the CPU)")
    bops.add_argument("--batches", help="comma-separated batch sizes to run every case at (default: each case's own)")
    bops.add_argument("--calls", type=int, help="back-to-back calls per timed sample (default: 20 on CUDA, 1 on CPU)")
    bops.add_argument("--output", help=f"CSV to append to (default: {DEFAULT_DIR}/ops.csv in the current directory)")
    bops.add_argument("--no-save", action="store_true", help="print only, append nothing")
    bops.set_defaults(func=_cmd_bench_ops)

    from .bench import step as bench_step

    bstep = bench_sub.add_parser(
        "step", help="whole training steps: eager fp32 / eager bf16 / torch.compile vs the kdengine step",
        description="Images per second of whole teacher-student training steps (forwards, losses, backward, "
                    "optimizer) for DML+ADM and KD+ADM, the providers interleaved: eager-fp32 (the public KD "
                    "codebases' loop, Algorithm 1's unfused ADM), eager-bf16 (autocast, channels_last), compile "
                    "(torch.compile of the forwards and losses) and kdengine (fused ops; on CUDA bf16 "
                    "channels_last and the captured graph). Reports MFU and the step's peak memory; appends one "
                    f"row per measurement to --output (default: {DEFAULT_DIR}/step.csv in the current directory).")
    bstep.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    bstep.add_argument("--cases", help=f"comma-separated: {', '.join(bench_step.CASES)} (default: "
                                       f"{', '.join(bench_step.DEFAULT_CASES['cpu'])} on the CPU, all on CUDA)")
    bstep.add_argument("--methods", help=f"comma-separated: {', '.join(bench_step.METHODS)} (default: both)")
    bstep.add_argument("--providers", help=f"comma-separated: {', '.join(bench_step.PROVIDERS)} (default: all)")
    bstep.add_argument("--repeat", type=int, default=5, help="timed windows per provider (default: 5)")
    bstep.add_argument("--steps-per-window", type=int, default=5, help="steps in one timed window (default: 5)")
    bstep.add_argument("--warmup", type=int, default=4, help="untimed steps per provider first (default: 4)")
    bstep.add_argument("--batch", type=int, help="batch size for every case (default: each case's own)")
    bstep.add_argument("--profile", metavar="CASE",
                       help="instead of timing: print torch.profiler's operator table of the kdengine step of CASE")
    bstep.add_argument("--output", help=f"CSV to append to (default: {DEFAULT_DIR}/step.csv in the current directory)")
    bstep.add_argument("--no-save", action="store_true", help="print only, append nothing")
    bstep.set_defaults(func=_cmd_bench_step)

    bdata = bench_sub.add_parser(
        "data", help="FFCV ImageNet pipeline vs PIL + torch DataLoader, images per second",
        description="Images per second of the FFCV ImageNet training pipeline (RandomResizedCrop 224 + flip, "
                    "normalised float32 NCHW batches on the CPU) against PIL + torch.utils.data.DataLoader "
                    "doing the same with the same number of workers, on a generated ImageNet-like set of "
                    "JPEGs (cached under the kdengine cache dir). One warm-up epoch each, then --epochs "
                    "timed epochs each, in alternation. Appends one row per loader to --output (default: "
                    f"{DEFAULT_DIR}/data.csv in the current directory).")
    bdata.add_argument("--num-images", type=int, default=3000, help="JPEGs in the generated set (default: 3000)")
    bdata.add_argument("--workers", type=int, default=0,
                       help="worker processes (DataLoader) and threads (FFCV), the same for both "
                            "(default: 0 = all CPU cores)")
    bdata.add_argument("--batch-size", type=int, default=64, help="default: 64")
    bdata.add_argument("--epochs", type=int, default=5, help="timed epochs per loader (default: 5)")
    bdata.add_argument("--write-mode", choices=WRITE_MODES, default="jpg",
                       help="how the .beton stores the images: jpg (default: JPEG like the baseline's files), "
                            "proportion (half raw, ffcv-imagenet's setting), raw, smart")
    bdata.add_argument("--cache-root", help="where the image set and .beton are kept (default: the kdengine "
                                            "cache dir, $KDENGINE_CACHE or ~/.cache/kdengine)")
    bdata.add_argument("--output", help=f"CSV to append to (default: {DEFAULT_DIR}/data.csv in the current directory)")
    bdata.add_argument("--no-save", action="store_true", help="print only, append nothing")
    bdata.set_defaults(func=_cmd_bench_data)


# ------------------------------------------------------------------------------ kdengine data write


def _cmd_data_write(args) -> int:
    """``kdengine data write SOURCE_FORMAT ...``: the work is kdengine.data.write's; errors are
    one line on stderr and exit code 1 (argparse's own usage errors exit 2)."""

    from .data import write as data_write

    prog = f"kdengine data write {args.source_format}"
    options = data_write.WriteOptions(
        write_mode=args.write_mode, compress_probability=args.compress_probability, jpeg_quality=args.jpeg_quality,
        num_workers=args.num_workers, chunk_size=args.chunk_size, overwrite=args.overwrite)
    settings = {name: getattr(args, name) for name in data_write.SOURCE_ARGS[args.source_format]}
    try:
        with _StageBars() as progress:
            result = data_write.write(args.source_format, args.output, options, progress=progress, **settings)
    except ImportError as exc:
        print(f"{prog}: error: {exc} (FFCV is needed: pip install 'kdengine[ffcv]')", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # missing source, existing output, bad values, bad files
        print(f"{prog}: error: {_error_text(exc, args, positionals=('source', 'output'))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {args.output} was not written", file=sys.stderr)
        return 130
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image(s):", file=sys.stderr)
        for path, reason in result.skipped[:20]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(result.skipped) > 20:
            print(f"  ... and {len(result.skipped) - 20} more", file=sys.stderr)
    print(f"wrote {result.samples} samples to {result.path} ({data_write.format_size(result.size_bytes)}, "
          f"write mode {result.write_mode}) in {result.seconds:.1f} s")
    return 0


class _StageBars:
    """``progress(stage, done, total)`` for a library call: one rich bar per stage, shown from the
    first report on, so that nothing is drawn when a check fails before any long work."""

    def __init__(self):
        self._bars = None
        self._tasks = {}

    def __enter__(self):
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self._bars is None:
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn())
            self._bars.start()
        if stage not in self._tasks:
            self._tasks[stage] = self._bars.add_task(stage, total=total)
        self._bars.update(self._tasks[stage], completed=done, total=total)

    def __exit__(self, *exc_info):
        if self._bars is not None:
            self._bars.stop()


_DATA_WRITE_EPILOG = """\
examples:
  kdengine data write embedded embedded_train.beton --split train
  kdengine data write embedded tiny.beton --size 64 --num-classes 5 --per-class 100 --seed 1
  kdengine data write cifar ~/data/cifar-10-batches-py cifar10_train.beton --split train
  kdengine data write imagefolder ~/imagenet/train in1k_train.beton \\
      --max-resolution 500 --write-mode proportion --compress-probability 0.5 --jpeg-quality 90
  kdengine data write cityscapes ~/data/cityscapes data/cityscapes/val.beton --split val

The output is written to a temporary file next to it and renamed into place when complete, so a
.beton at the output path is never partial. An existing output is refused unless --overwrite.
Errors are one line on stderr and exit code 1.
"""


def _add_write_options(parser: argparse.ArgumentParser, source_format: str) -> None:
    from .data import WRITE_MODES
    from .data.write import DEFAULT_WRITE_MODE

    g = parser.add_argument_group("image encoding and writing (FFCV RGBImageField / DatasetWriter)")
    g.add_argument("--write-mode", choices=WRITE_MODES,
                   help="raw: uncompressed pixels (bit-exact, fastest to decode, largest); jpg: every image "
                        "JPEG; proportion: JPEG with probability --compress-probability; smart: FFCV's "
                        "per-image choice, which in FFCV 1.0.2 without a size threshold writes raw "
                        "(default for this source: "
                        f"{DEFAULT_WRITE_MODE[source_format]})")
    g.add_argument("--compress-probability", type=float, default=0.5, metavar="P",
                   help="share of images JPEG-compressed in 'proportion' mode (default: 0.5)")
    g.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="JPEG quality 1-100 (default: 90)")
    g.add_argument("--num-workers", type=int, metavar="N", help="writer processes (default: all CPU cores)")
    from .data.write import DEFAULT_CHUNK_SIZE

    g.add_argument("--chunk-size", type=int, metavar="N",
                   help=f"samples per writer work unit (default: {DEFAULT_CHUNK_SIZE[source_format]})")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="datasets: write .beton files (embedded, CIFAR, ImageFolder, Cityscapes)",
                          description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND", title="commands")
    write = data_sub.add_parser(
        "write", help="write a dataset to an FFCV .beton file",
        description="Write a dataset to an FFCV .beton file. Pick the source format first;\n"
                    "`kdengine data write FORMAT --help` lists its options.",
        epilog=_DATA_WRITE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = write.add_subparsers(dest="source_format", required=True, metavar="FORMAT",
                                   title="source formats")

    emb = formats.add_parser(
        "embedded", help="the built-in generated dataset (shapes on cluttered backgrounds, with masks)",
        description="Generate one split of the embedded dataset (no download: images are computed "
                    "from the seed; the same parameters give the same bytes) and write it with the "
                    "fields image, label and mask.")
    emb.add_argument("output", help="the .beton file to write")
    emb.add_argument("--split", choices=["train", "val"], default="train", help="default: train")
    emb.add_argument("--size", type=int, default=32, help="image side in pixels, at least 16 (default: 32)")
    emb.add_argument("--num-classes", type=int, default=10, help="shape classes, 1-10 (default: 10)")
    emb.add_argument("--per-class", type=int, metavar="N",
                     help="images per class in the split (default: 5000 train, 1000 val)")
    emb.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    _add_write_options(emb, "embedded")

    cif = formats.add_parser(
        "cifar", help="a CIFAR-10 / CIFAR-100 python-pickle directory",
        description="Write one split of CIFAR-10 (cifar-10-batches-py) or CIFAR-100 (cifar-100-python), "
                    "the python-pickle directories of the official archives, with the fields image and "
                    "label (CIFAR-100: the fine labels).")
    cif.add_argument("source", help="the extracted cifar-10-batches-py or cifar-100-python directory")
    cif.add_argument("output", help="the .beton file to write")
    cif.add_argument("--split", choices=["train", "test"], default="train", help="default: train")
    _add_write_options(cif, "cifar")

    imf = formats.add_parser(
        "imagefolder", help="an ImageNet-style tree: one sub-folder of images per class",
        description="Write an ImageFolder tree (SOURCE/<class>/<image>, classes labelled 0.. in sorted "
                    "order) with the fields image and label. Every image is decoded once first "
                    "(progress bar), so an unreadable file is found before writing starts.")
    imf.add_argument("source", help="the root folder holding one folder per class")
    imf.add_argument("output", help="the .beton file to write")
    imf.add_argument("--max-resolution", type=int, metavar="PX",
                     help="downscale images whose longer side exceeds PX (ffcv-imagenet uses 256-512; "
                          "default: keep the original size)")
    imf.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                     help="an unreadable image: fail naming it (default), or skip it and list the skipped "
                          "files at the end")
    _add_write_options(imf, "imagefolder")

    city = formats.add_parser(
        "cityscapes", help="Cityscapes (leftImg8bit + gtFine) for semantic segmentation",
        description="Write one split of Cityscapes in its standard layout (SOURCE/leftImg8bit/<split>/<city>/"
                    "*_leftImg8bit.png with SOURCE/gtFine/<split>/<city>/*_gtFine_labelIds.png; the data needs a "
                    "registration at cityscapes-dataset.com, nothing is downloaded) with the fields image, label "
                    "(the 19 train ids, 255 ignored, stored losslessly) and index. Raw images take about 23 GiB "
                    "for train; --write-mode jpg about a tenth (lossy images, labels still exact).")
    city.add_argument("source", help="the Cityscapes root holding leftImg8bit/ and gtFine/")
    city.add_argument("output", help="the .beton file to write")
    city.add_argument("--split", default="train", help="the split folder: train, val or test (default: train)")
    _add_write_options(city, "cityscapes")
    for p in (emb, cif, imf, city):
        p.set_defaults(func=_cmd_data_write)


# ------------------------------------------------------------------------------ kdengine train / eval / viz


def _results_table(title: str, tags, names, roles, last: dict, best: dict | None = None):
    from rich.table import Table

    from .engine.metrics import primary_metric

    table = Table(title=title)
    seg = primary_metric(last) == "miou"
    first, second = ("miou", "pixel_accuracy") if seg else ("top1", "top5")
    label, label2 = ("mIoU", "pixel acc.") if seg else ("top-1", "top-5")
    for col in ("model", "architecture", "role", f"{label} (last)", f"{label2} (last)") + \
            ((f"{label} (best)",) if best else ()):
        table.add_column(col)
    rows = list(zip(tags, names, roles)) + [("ensemble", "mean of the probabilities", "")]
    for tag, name, role in rows:
        cells = [tag, name, role, f"{last.get(f'{tag}/{first}', float('nan')):.2f}",
                 f"{last.get(f'{tag}/{second}', float('nan')):.2f}"]
        if best:
            cells.append(f"{best.get(tag, float('nan')):.2f}")
        table.add_row(*cells)
    return table


#: kdengine train's flags that set a setting: (argparse dest, dotted setting).
_TRAIN_FLAGS = (("method", "method.name"), ("resume", "train.resume"), ("device", "train.device"),
                ("epochs", "train.epochs"), ("output_dir", "train.output_dir"), ("run_name", "train.run_name"))


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after a command as before it (its default leaves the top-level value alone)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error too (errors you can fix are one line without it)")


def _fail(prog: str, message: str, args, code: int = 2) -> int:
    """An error the user can fix: one line on stderr, after its traceback with --debug."""
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _with_flags(text: str, args) -> str:
    """A library message in the words the user typed: ``train.device=cuda`` becomes ``--device cuda``
    where the device came from ``--device``."""
    for dest, key in _TRAIN_FLAGS:
        if getattr(args, dest, None) is not None:
            text = text.replace(f"{key}=", f"{_flag(dest)} ")
    return text


def _train_overrides(args) -> list[str]:
    """The key=value items of a `kdengine train` command line, its flags after them (they win)."""
    overrides = list(args.overrides)
    overrides += [f"{key}={getattr(args, dest)}" for dest, key in _TRAIN_FLAGS if getattr(args, dest) is not None]
    if args.no_cuda_graph:
        overrides.append("train.cuda_graph=false")
    return overrides


def _resume_command(args, cfg, run_dir, status) -> str:
    """The `kdengine train` command that continues ``run_dir`` after it stopped with ``status``:
    this command's settings, with ``--resume auto --run-name`` naming the run (and without
    ``train.max_steps`` when that stopped it)."""
    import shlex
    from pathlib import Path

    from .engine import RunStatus

    elsewhere = run_dir.parent != Path(cfg.train.output_dir)  # resumed from a checkpoint path
    drop = ("train.resume=", "train.run_name=") + (("train.output_dir=",) if elsewhere else ())
    drop += ("train.max_steps=",) if status is RunStatus.MAX_STEPS else ()
    words = ["kdengine", "train"] + (["--config", args.config] if args.config else [])
    words += [o for o in args.overrides if not o.strip().startswith(drop)]
    words += ["train.max_steps=null"] if status is RunStatus.MAX_STEPS else []
    for dest, _ in _TRAIN_FLAGS:
        value = getattr(args, dest)
        if value is not None and dest not in ("resume", "run_name") and not (elsewhere and dest == "output_dir"):
            words += [_flag(dest), str(value)]
    words += ["--no-cuda-graph"] * bool(args.no_cuda_graph) + ["--quiet"] * bool(args.quiet)
    words += ["--no-report"] * bool(getattr(args, "no_report", False))
    words += ["--output-dir", str(run_dir.parent)] if elsewhere else []
    return " ".join(shlex.quote(w) for w in words + ["--resume", "auto", "--run-name", run_dir.name])


def _data_notice(cfg) -> str | None:
    """What the first run on an embedded dataset spends its first minute on, or None when it is cached."""
    from .data import EmbeddedSpec, cache_dir
    from .engine.datasets import ffcv_available

    if cfg.data.dataset != "embedded":
        return None
    e = cfg.data.embedded
    spec = EmbeddedSpec(num_classes=e.num_classes, size=e.size, train_per_class=e.train_per_class,
                        val_per_class=e.val_per_class, seed=e.seed)
    where = cache_dir() / spec.key()
    if ffcv_available() and where.is_dir():
        return None
    images = f"{spec.count('train'):,} + {spec.count('val'):,} images of {spec.size} px"
    if not ffcv_available() or cfg.data.task == "segmentation":  # no .beton cache: generated in memory each run
        return f"data: generating the embedded dataset ({images}); the default's 25,000 take about a minute on 2 cores"
    return (f"data: generating the embedded dataset ({images}) into {where}, once; the default's 25,000 take "
            f"about a minute on 2 cores, then FFCV writes them (its bars: the train split, then val)")


def _run_files(run_dir) -> str:
    """The records a run directory holds now (a run stopped in its first epoch has no metrics yet)."""
    from pathlib import Path

    names = ("config.yaml", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "curves.png", "tensorboard")
    return ", ".join(n for n in names if (Path(run_dir) / n).exists())


def _cmd_train(args) -> int:
    from rich.console import Console

    from .engine import ConfigError, NonFiniteLossError, RunStatus, Trainer, load_config

    console = Console()
    if not console.is_terminal:  # a log file: long lines kept whole, tables not squeezed into 80 columns
        console = Console(soft_wrap=True, width=max(console.width, 120))
    prog = "kdengine train"
    try:
        cfg = load_config(args.config, _train_overrides(args))
        notice = _data_notice(cfg) if not args.quiet else None
        if notice:
            console.print(notice, markup=False)
        trainer = Trainer(cfg, progress=not args.quiet, console=console)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        return _fail(prog, _with_flags(str(exc), args), args)
    trainer.resume_hint = lambda status: _resume_command(args, cfg, trainer.run_dir, status)
    if trainer.dist.is_main:
        models = ", ".join(f"{m.name} ({m.role})" for m in cfg.models)
        console.print(f"[bold]kdengine train[/]: {cfg.method.name} on {models}; data {cfg.data.dataset}; "
                      f"{cfg.train.epochs} epoch{'s' * (cfg.train.epochs != 1)} of {trainer.steps_per_epoch} steps "
                      f"on {trainer.device}"
                      f"{' x' + str(trainer.dist.world_size) if trainer.dist.enabled else ''}")
        console.print(f"run directory: {trainer.run_dir}", markup=False)
    try:
        summary = trainer.fit()
    except NonFiniteLossError as exc:
        return _fail(prog, str(exc), args, code=1)
    finally:
        trainer.dist.close()
    if not trainer.dist.is_main:
        return 0
    last = summary["last"]
    if last:
        finished = "" if summary["status"] is RunStatus.COMPLETED else f" (stopped: {summary['status']})"
        console.print(_results_table(f"{cfg.method.name}: validation after epoch {last['epoch'] + 1} of "
                                     f"{cfg.train.epochs}{finished}", trainer.tags, [m.name for m in cfg.models],
                                     list(trainer.roles), last, summary["best"]))
    else:
        console.print("no epoch finished: no validation results yet")
    console.print(f"run directory: {summary['run_dir']} ({_run_files(summary['run_dir'])})", markup=False)
    if summary["status"] is RunStatus.COMPLETED and not args.no_report:
        console.print(_train_report(summary["run_dir"], str(trainer.device)), markup=False)
    return 130 if summary["status"] is RunStatus.INTERRUPTED else 0


def _checkpoint_and_overrides(items: list[str]) -> tuple[str, list[str]]:
    """`kdengine eval`'s positionals in any order: the one that is not key=value (or is a path) is the
    checkpoint."""
    import os

    paths = [i for i in items if "=" not in i or os.path.exists(i)]
    checkpoint = paths[0] if len(paths) == 1 else items[0]
    return checkpoint, [i for i in items if i is not checkpoint]


def _cmd_eval(args) -> int:
    from rich.console import Console

    from .engine import ConfigError
    from .engine.evaluate import evaluate_checkpoint

    checkpoint, overrides = _checkpoint_and_overrides([args.checkpoint, *args.overrides])
    try:
        result = evaluate_checkpoint(checkpoint, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return _fail("kdengine eval", str(exc), args)
    epoch, step = result["epoch"], result["step_in_epoch"]
    when = f"after epoch {epoch}" if step == 0 else f"in epoch {epoch + 1}, after {step} of its steps"
    console = Console()
    console.print(_results_table(f"{result['path']} ({when}): validation", result["tags"], result["names"],
                                 result["roles"], result["metrics"]))
    per_class = _per_class_table(result["tags"], result["metrics"])
    if per_class is not None:
        console.print(per_class)
    return 0


def _per_class_table(tags, metrics: dict):
    """Segmentation: the IoU (%) of every class (rows) for every model and the ensemble (columns);
    None for classification metrics."""
    from rich.table import Table

    columns = [*tags, "ensemble"]
    classes = [k.split("/iou/", 1)[1] for k in metrics if k.startswith(f"{columns[0]}/iou/")]
    if not classes:
        return None
    table = Table(title="IoU per class (%; – where a class is in neither the labels nor the predictions)")
    for col in ("class", *columns):
        table.add_column(col)
    for c in classes:
        values = [metrics.get(f"{tag}/iou/{c}", float("nan")) for tag in columns]
        table.add_row(c, *("–" if v != v else f"{v:.2f}" for v in values))
    return table


def _add_train_parsers(sub) -> None:
    train = sub.add_parser(
        "train", help="train models with a distillation method (no arguments: the embedded default)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train M models jointly with a distillation method.\n\n"
                    "With no arguments: DML+ADM, a WRN-16-2 teacher and a ResNet-8 student on the embedded\n"
                    "dataset (16 px, 10 classes; generated and cached on first use), 6 epochs, about five\n"
                    "minutes on 2 CPU cores; a table of the results and a run directory under runs/ at the end.\n"
                    "A YAML from configs/ sets up a paper experiment; key=value items override any setting.",
        epilog="examples:\n"
               "  kdengine train\n"
               "  kdengine train train.epochs=3 method.name=dml\n"
               "  kdengine train --config configs/cifar100/table1_resnet32x4_resnet8x4.yaml method.name=dml\n"
               "  kdengine train --method vanilla --run-name teacher\n"
               "  kdengine train --method kd+adm models.0.checkpoint=runs/teacher/checkpoint.pt\n"
               "  kdengine train --resume auto --run-name NAME   # continue a stopped run (the stop message\n"
               "                                                 # prints this command)\n"
               "  torchrun --nproc-per-node 8 -m kdengine.cli train --config ...\n"
               "settings: see configs/embedded/default.yaml (every key with its default).",
    )
    train.add_argument("--config", help="experiment YAML (e.g. configs/...); default: the embedded default")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. optim.lr=0.05 models.1.name=resnet8 method.options.adm.beta=0.1")
    train.add_argument("--method",
                       help="method.name, e.g. vanilla, dml, dml+adm, kd+adm (see kdengine.methods.list_methods)")
    train.add_argument("--resume",
                       help="auto: continue the stopped run of this name (--run-name, else the default name "
                            "or its numbered copies NAME-2, ...), an error when there is none or several; "
                            "auto-or-new: the same, but start a new run when there is none (job scripts); or a "
                            "checkpoint path or run directory. A finished run is never resumed (train.resume)")
    train.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device)")
    train.add_argument("--epochs", type=int, help="train.epochs")
    train.add_argument("--output-dir", help="parent of run directories (train.output_dir, default runs)")
    train.add_argument("--run-name", help="run directory name (train.run_name)")
    train.add_argument("--no-cuda-graph", action="store_true", help="run the step eagerly on CUDA")
    train.add_argument("--quiet", action="store_true",
                       help="no progress (a bar on a terminal, else a line every train.log_every steps)")
    train.add_argument("--no-report", action="store_true",
                       help="no HTML report (RUN_DIR/report.html: curves, maps, IoU, calibration) at the end")
    _add_debug(train)
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint's models and their ensemble on the validation set")
    ev.add_argument("checkpoint", help="a run directory or a checkpoint.pt written by kdengine train")
    ev.add_argument("overrides", nargs="*", metavar="key=value",
                    help="override the stored configuration, e.g. data.val_path=... train.device=cpu")
    _add_debug(ev)
    ev.set_defaults(func=_cmd_eval)

    _add_viz_parser(sub)


def _cmd_viz(args) -> int:
    """``kdengine viz RUN_DIR ...``: each run's pictures into its directory (and ``--compare``);
    ``kdengine viz report PATH ...``: the HTML report."""
    from .viz.analysis import KINDS, analyze_run
    from .viz.bands import plot_runs

    targets = list(args.targets)
    if targets[0] == "report":
        return _cmd_viz_report(args, targets[1:])
    prog = "kdengine viz"
    kinds = _csv_list(args.only)
    if kinds and any(k not in KINDS for k in kinds):
        return _fail(prog, f"--only {args.only}: choose among {', '.join(KINDS)}", args)
    if args.output and len(targets) > 1:
        return _fail(prog, "--output names one run's curves PNG; with several runs use --compare PATH", args)
    try:
        for run in targets:
            result = analyze_run(run, kinds, device=args.device, images=args.images, iou_images=args.iou_images,
                                 curves_path=args.output)
            for kind, paths in result["files"].items():
                print(f"{run}: {kind}: {', '.join(str(p) for p in paths)}")
            for note in result["notes"]:
                print(f"{run}: note: {note}")
        if args.compare:
            print(f"wrote {plot_runs(targets, args.compare, args.over or 'train.seed')}")
    except (FileNotFoundError, ValueError) as exc:
        return _fail(prog, str(exc), args)
    except OSError as exc:  # an image cannot be written there
        return _fail(prog, f"cannot write {exc.filename}: {exc.strerror}; pass --output with a writable path", args)
    return 0


def _cmd_viz_report(args, paths: list[str]) -> int:
    from .viz.report import write_report

    prog = "kdengine viz report"
    if not paths:
        return _fail(prog, "give run directories or sweep folders: kdengine viz report RUN_DIR [RUN_DIR ...]", args)
    if args.compare or args.only:
        return _fail(prog, "--compare and --only are for the pictures; the report holds them all", args)
    try:
        path = write_report(paths, args.output, device=args.device, images=args.images, iou_images=args.iou_images,
                            seed_key=args.over, log=print)
    except (FileNotFoundError, ValueError) as exc:
        return _fail(prog, str(exc), args)
    except OSError as exc:
        return _fail(prog, f"cannot write {exc.filename}: {exc.strerror}; pass --output with a writable path", args)
    print(f"wrote {path}")
    return 0


def _train_report(run_dir, device) -> str:
    """The HTML report at the end of a finished `kdengine train`, as the line that says where it is;
    a report that cannot be drawn is a warning, never a failed run."""
    from .viz.report import write_report

    try:
        return f"report: {write_report([run_dir], device=device)}"
    except Exception as exc:  # the run itself succeeded; say why the pictures are missing
        return f"report: not written ({type(exc).__name__}: {exc}); try `kdengine viz report {run_dir} --debug`"


_VIZ_EPILOG = """\
examples:
  kdengine viz runs/RUN                        # curves, maps, IoU, calibration into runs/RUN/
  kdengine viz runs/RUN --only maps --images 10
  kdengine viz runs/A runs/B runs/C --compare compare.png   # seeds of one setting as a band
  kdengine viz report runs/RUN                 # runs/RUN/report.html (self-contained, offline)
  kdengine viz report sweeps/embedded runs/A runs/B --output report.html

Maps: S = cos(student, teacher) of the last stage (through the run's ADM connector, the identity,
or a least-squares map where channels differ), ADM's A_co and A_di, each model's CAM. IoU with
the object (data with masks, e.g. the embedded set): CAM region = min-max scaled CAM >= 0.5;
similar region = S >= its image mean (A_co >= 1); discrepant = the rest; per kept epoch
checkpoint (train.keep_checkpoints=true), else the last one. Calibration: 15-bin ECE.
"""


def _add_viz_parser(sub) -> None:
    from .viz.analysis import KINDS

    viz = sub.add_parser(
        "viz", help="pictures of runs (curves, maps, foreground IoU, calibration); `viz report`: an HTML page",
        usage="kdengine viz [options] RUN_DIR [RUN_DIR ...]\n"
              "       kdengine viz report RUN_DIR|SWEEP_DIR [...] [--output HTML] [options]",
        description="Draw each run's pictures into its directory, each PNG with its numbers (JSON) beside it; "
                    "`kdengine viz report PATH ...` writes one self-contained HTML report of run directories "
                    "and sweep folders instead.",
        epilog=_VIZ_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    viz.add_argument("targets", nargs="+", metavar="RUN_DIR",
                     help="run directories; `report` first: the report of run directories and sweep folders")
    viz.add_argument("--only", help=f"comma-separated: {', '.join(KINDS)} (default: all; the curves alone for a "
                                    "run without checkpoint.pt)")
    viz.add_argument("--output", help="one run: its curves PNG (default RUN_DIR/curves.png); report: the HTML "
                                      "(default PATH/report.html for one path, else ./kdengine-report.html)")
    viz.add_argument("--compare", metavar="PNG", help="also the runs' curves in one plot, seeds as bands")
    viz.add_argument("--over", metavar="KEY", help="the setting averaged in bands and sweep tables (default: "
                                                   "train.seed)")
    viz.add_argument("--device", default="auto", help="where the models run: auto (default), cpu, cuda, cuda:N")
    viz.add_argument("--images", type=int, default=6, help="validation images in the maps grid (default: 6)")
    viz.add_argument("--iou-images", type=int, default=500,
                     help="validation images of the IoU analysis (default: 500)")
    _add_debug(viz)
    viz.set_defaults(func=_cmd_viz)


# ------------------------------------------------------------------------------ kdengine sweep


def _cmd_sweep(args) -> int:
    import shlex

    from .engine import ConfigError
    from .sweep import (
        LocalLauncher,
        SubmititLauncher,
        SweepError,
        describe,
        launch_sweep,
        prepare_sweep,
        train_command,
    )

    items = list(args.overrides)
    if items and items[0] == "table":
        return _cmd_sweep_table(args, items[1:])
    prog = "kdengine sweep"
    if not items:
        return _fail(prog, "nothing to sweep: give overrides, e.g. method.name=dml,dml+adm train.seed=0,1,2 "
                           "(kdengine sweep --help)", args)
    try:
        parameters = dict(_executor_parameter(item) for item in args.executor_param or [])
        sweep = prepare_sweep(items, args.config, args.name, args.output_dir, args.over or "train.seed",
                              dry_run=args.dry_run, here=args.launcher == "local")
        launcher = (SubmititLauncher(sweep.sweep_dir / "submitit", args.cluster, parameters, wait=not args.no_wait)
                    if args.launcher == "submitit" and not args.dry_run else LocalLauncher())
    except (SweepError, ConfigError, FileNotFoundError, ModuleNotFoundError) as exc:
        return _fail(prog, str(exc), args)
    print(f"sweep {sweep.sweep_dir}: {len(sweep.runs)} runs, {len(sweep.pending)} to run"
          + (f" ({len(sweep.plan.runs)} planned in the folder)" if len(sweep.plan.runs) != len(sweep.runs) else ""))
    for line in describe(sweep):
        print(f"  {line}")
    if args.dry_run:
        for run in sweep.pending:
            print(f"  $ {shlex.join(train_command(run, sweep.sweep_dir, sweep.config, args.quiet))}")
        return 0
    try:
        results = launch_sweep(sweep, launcher, quiet=args.quiet)
    except KeyboardInterrupt:  # a second Ctrl-C, between runs
        print("interrupted: the same command resumes the sweep (finished runs are skipped)")
        return 130
    statuses = {r["status"] for r in results.values()}
    if args.launcher == "submitit" and args.no_wait:
        print(f"submitted; `kdengine sweep table {sweep.sweep_dir}` once they have run")
        return 0
    code = _print_sweep_table(sweep.sweep_dir, args.over)
    if "interrupted" in statuses:
        print("interrupted: the same command resumes the sweep (finished runs are skipped)")
        return 130
    return 1 if "failed" in statuses else code


def _print_sweep_table(sweep_dir, over) -> int:
    from .sweep import to_markdown, write_tables

    table, paths = write_tables(sweep_dir, over)
    print(to_markdown(table), end="")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _cmd_sweep_table(args, rest: list[str]) -> int:
    prog = "kdengine sweep table"
    if len(rest) != 1:
        return _fail(prog, "give one sweep folder: kdengine sweep table SWEEP_DIR", args)
    try:
        return _print_sweep_table(rest[0], args.over)
    except FileNotFoundError as exc:
        return _fail(prog, str(exc), args)


def _executor_parameter(item: str) -> tuple:
    """``--executor-param timeout_min=60`` -> ``("timeout_min", 60)`` (the value read as YAML)."""
    import yaml

    from .sweep import SweepError

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SweepError(f"--executor-param {item!r} must look like key=value, e.g. timeout_min=60")
    return key.strip(), yaml.safe_load(value)


_SWEEP_EPILOG = """\
examples:
  kdengine sweep method.name=vanilla,dml,dml+adm train.seed=0,1,2,3,4
  kdengine sweep --name ablation method.name=dml+adm train.seed=0,1,2 \\
      'method.options.adm={alpha: 0, beta: 0},{gamma: 0},{},{gamma: 0.01}'
  kdengine sweep --config configs/cifar100/table1_resnet32x4_resnet8x4.yaml method.name=dml,dml+adm \\
      train.seed=0,1,2 --launcher submitit --executor-param timeout_min=600 \\
      --executor-param gpus_per_node=1 --executor-param slurm_partition=gpu
  kdengine sweep ... --dry-run                # list the runs and their commands, change nothing
  kdengine sweep table sweeps/embedded        # table.md, table.csv, runs.csv (also after a sweep)

A value splits at commas outside [...], {...} and quotes; a mapping value sets several keys at
once (the ablation above is one axis of 4). Runs are `kdengine train` processes with
train.output_dir=SWEEP_DIR train.run_name=<axis values> train.resume=auto-or-new: the same
command again skips finished runs and resumes interrupted ones exactly. Ctrl-C stops the current
run with a checkpoint and ends the sweep. The table: rows = settings, columns = every model's
last and best top-1, mean ± sample std over train.seed, n = finished runs; failed and missing
runs are counted and listed, never averaged.
"""


def _add_sweep_parser(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="many runs (the cartesian product of comma-separated overrides) and their mean ± std table",
        usage="kdengine sweep [options] key=v1,v2,... [key=value ...]\n"
              "       kdengine sweep table SWEEP_DIR [--over KEY]",
        description="Run the cartesian product of comma-separated overrides as run directories under one "
                    "sweep folder (OUTPUT_DIR/NAME), then write its table. `kdengine sweep table SWEEP_DIR` "
                    "writes the table of a sweep folder.",
        epilog=_SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("overrides", nargs="*", metavar="key=v1,v2",
                       help="dotted overrides; several comma-separated values make an axis (a trailing "
                            "comma: an axis of one value, named in the runs' folders)")
    sweep.add_argument("--config", help="experiment YAML (default: the embedded default)")
    sweep.add_argument("--name", help="the sweep folder's name (default: the config file's stem, or 'embedded')")
    sweep.add_argument("--output-dir", default="sweeps", help="parent of sweep folders (default: sweeps)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and what would happen; write nothing")
    sweep.add_argument("--launcher", choices=["local", "submitit"], default="local",
                       help="local: one run after the other here (default); submitit: each run a job (SLURM "
                            "through the submitit package: pip install 'kdengine[sweep]')")
    sweep.add_argument("--cluster", help="submitit's executor: slurm, local or debug (default: submitit's "
                                         "detection, SLURM where sbatch exists)")
    sweep.add_argument("--executor-param", action="append", metavar="KEY=VALUE",
                       help="submitit parameter, repeatable: timeout_min, gpus_per_node, cpus_per_task, mem_gb, "
                            "slurm_partition, slurm_account, ...")
    sweep.add_argument("--no-wait", action="store_true", help="submitit: return once the jobs are submitted")
    sweep.add_argument("--over", metavar="KEY", help="the setting the table averages over (default: train.seed)")
    sweep.add_argument("--quiet", action="store_true", help="the runs print no progress")
    _add_debug(sweep)
    sweep.set_defaults(func=_cmd_sweep)


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdengine",
        description="kdengine: knowledge distillation with fused kernels. Commands: train, eval, viz, sweep, "
                    "data, bench, info. Start with `kdengine train` (the embedded default).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error too (errors you can fix are one line without it)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices, compiled backends, Triton and FFCV")
    info.set_defaults(func=_cmd_info)
    _add_bench_parsers(sub)
    _add_data_parser(sub)
    _add_train_parsers(sub)
    _add_sweep_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    # key=value overrides may come anywhere among a command's flags, as users type them
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
