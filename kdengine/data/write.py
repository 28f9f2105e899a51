"""What ``kdengine data write`` does: one entry point over the three ``.beton`` writers of
:mod:`kdengine.data.beton` (embedded dataset, CIFAR python-pickle directory, ImageFolder tree),
with every option checked before any long work starts, and a summary of what was written.

The command line (kdengine/cli.py) only parses arguments, shows progress and prints the result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

SOURCE_FORMATS = ("embedded", "cifar", "imagefolder")
ON_ERROR = ("fail", "skip")
#: The default ``write_mode`` per source: the embedded and CIFAR images are tiny (raw is smaller
#: to decode and bit-exact); an ImageFolder of photos is written as ffcv-imagenet does.
DEFAULT_WRITE_MODE = {"embedded": "raw", "cifar": "raw", "imagefolder": "proportion"}


@dataclass
class WriteOptions:
    """The FFCV ``RGBImageField`` and ``DatasetWriter`` options shared by every source."""

    write_mode: Optional[str] = None  # None: DEFAULT_WRITE_MODE of the source
    compress_probability: float = 0.5
    jpeg_quality: int = 90
    num_workers: Optional[int] = None  # None: all CPU cores
    chunk_size: int = 100
    overwrite: bool = False


@dataclass
class WriteResult:
    path: Path
    source_format: str
    samples: int
    size_bytes: int
    seconds: float
    write_mode: str
    skipped: list = field(default_factory=list)  # (file, reason) pairs an ImageFolder write left out


def check_options(source_format: str, output, options: WriteOptions, *, max_resolution=None,
                  on_error: str = "fail") -> None:
    """Raise ``ValueError`` / ``FileExistsError`` for anything that would fail later, before any
    generation, decoding or writing starts."""
    from .beton import WRITE_MODES

    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"source format must be one of {SOURCE_FORMATS}, got {source_format!r}")
    mode = options.write_mode or DEFAULT_WRITE_MODE[source_format]
    if mode not in WRITE_MODES:
        raise ValueError(f"--write-mode must be one of {WRITE_MODES}, got {mode!r}")
    if not 0.0 <= options.compress_probability <= 1.0:
        raise ValueError(f"--compress-probability must be in [0, 1], got {options.compress_probability}")
    if not 1 <= options.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in [1, 100], got {options.jpeg_quality}")
    if options.num_workers is not None and options.num_workers < 1:
        raise ValueError(f"--num-workers must be at least 1, got {options.num_workers}")
    if options.chunk_size < 1:
        raise ValueError(f"--chunk-size must be at least 1, got {options.chunk_size}")
    if max_resolution is not None and max_resolution < 1:
        raise ValueError(f"--max-resolution must be at least 1, got {max_resolution}")
    if on_error not in ON_ERROR:
        raise ValueError(f"--on-error must be one of {ON_ERROR}, got {on_error!r}")
    output = Path(output)
    if output.is_dir():
        raise IsADirectoryError(f"output {output} is a directory; give the .beton file's path")
    if output.exists() and not options.overwrite:
        raise FileExistsError(f"output {output} exists; pass --overwrite to replace it")


def prepare(source_format: str, output, options: WriteOptions = WriteOptions(), *, source=None,
            split: str = "train", max_resolution=None, on_error: str = "fail", size: int = 32,
            num_classes: int = 10, per_class: Optional[int] = None, seed: int = 0):
    """Every check of one write, done before any long work (and FFCV imported, so a missing FFCV
    fails here too). Returns the :class:`EmbeddedSpec` for ``embedded``, else ``None``."""
    import ffcv.fields  # noqa: F401  (slow first import: numba; done before progress bars start)

    spec = None
    if source_format == "embedded":
        from .embedded import EmbeddedSpec

        if split not in ("train", "val"):
            raise ValueError(f"embedded --split must be 'train' or 'val', got {split!r}")
        counts = {}
        if per_class is not None:
            counts = {"train_per_class" if split == "train" else "val_per_class": per_class}
        spec = EmbeddedSpec(num_classes=num_classes, size=size, seed=seed, **counts)  # validates
        if spec.count(split) == 0:
            raise ValueError("--per-class 0 gives an empty dataset")
    elif source_format == "cifar":
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR --split must be 'train' or 'test', got {split!r}")
        if not Path(source).is_dir():
            raise FileNotFoundError(f"CIFAR source {source} is not a directory")
    elif source_format == "imagefolder":
        if not Path(source).is_dir():
            raise FileNotFoundError(f"ImageFolder source {source} is not a directory")
    check_options(source_format, output, options, max_resolution=max_resolution, on_error=on_error)
    return spec


def _result(path, source_format, start, mode, skipped=()) -> WriteResult:
    from ffcv.reader import Reader

    path = Path(path)
    return WriteResult(path=path, source_format=source_format, samples=int(Reader(str(path)).num_samples),
                       size_bytes=path.stat().st_size, seconds=time.perf_counter() - start,
                       write_mode=mode, skipped=list(skipped))


def write_embedded_split(output, *, split: str = "train", size: int = 32, num_classes: int = 10,
                         per_class: Optional[int] = None, seed: int = 0,
                         options: WriteOptions = WriteOptions()) -> WriteResult:
    """Generate one split (``train`` or ``val``) of the embedded dataset and write it.
    ``per_class`` defaults to the :class:`~kdengine.data.embedded.EmbeddedSpec` default of the
    split (5000 train, 1000 val)."""
    from .beton import write_embedded

    spec = prepare("embedded", output, options, split=split, size=size, num_classes=num_classes,
                   per_class=per_class, seed=seed)
    mode = options.write_mode or DEFAULT_WRITE_MODE["embedded"]
    start = time.perf_counter()
    path = write_embedded(spec, split, output, overwrite=options.overwrite, write_mode=mode,
                          jpeg_quality=options.jpeg_quality, compress_probability=options.compress_probability,
                          num_workers=options.num_workers, chunk_size=options.chunk_size)
    return _result(path, "embedded", start, mode)


def write_cifar_split(output, *, source, split: str = "train",
                      options: WriteOptions = WriteOptions()) -> WriteResult:
    """Write the ``train`` or ``test`` split of a CIFAR-10/100 python-pickle directory."""
    from .beton import write_cifar

    prepare("cifar", output, options, source=source, split=split)
    mode = options.write_mode or DEFAULT_WRITE_MODE["cifar"]
    start = time.perf_counter()
    path = write_cifar(source, split, output, overwrite=options.overwrite, write_mode=mode,
                       jpeg_quality=options.jpeg_quality, compress_probability=options.compress_probability,
                       num_workers=options.num_workers, chunk_size=options.chunk_size)
    return _result(path, "cifar", start, mode)


def write_image_folder_tree(output, *, source, max_resolution: Optional[int] = None, on_error: str = "fail",
                            options: WriteOptions = WriteOptions(),
                            progress: Optional[Callable[[int, int], None]] = None) -> WriteResult:
    """Write an ImageFolder tree (one sub-folder per class). ``progress(done, total)`` follows the
    decode/validation pass over every image; FFCV's writer prints its own bar after it."""
    from .beton import write_image_folder

    prepare("imagefolder", output, options, source=source, max_resolution=max_resolution, on_error=on_error)
    mode = options.write_mode or DEFAULT_WRITE_MODE["imagefolder"]
    start = time.perf_counter()
    path, skipped = write_image_folder(
        source, output, overwrite=options.overwrite, max_resolution=max_resolution, write_mode=mode,
        jpeg_quality=options.jpeg_quality, compress_probability=options.compress_probability,
        on_error=on_error, num_workers=options.num_workers, chunk_size=options.chunk_size,
        progress=progress)
    return _result(path, "imagefolder", start, mode, skipped)


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
