"""What ``kdengine data write`` does: one entry point, :func:`write`, over the ``.beton`` writers of
:mod:`kdengine.data.beton` (embedded dataset, CIFAR python-pickle directory, ImageFolder tree) and
:mod:`kdengine.data.cityscapes` (the Cityscapes layout, for segmentation), with a summary of what
was written.

Every check lives with the writer that uses the value and runs before any long work (generation,
decoding, writing); the command line (kdengine/cli.py) only parses arguments, shows progress and
prints the result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import SettingError

SOURCE_FORMATS = ("embedded", "cifar", "imagefolder", "cityscapes")
#: The default ``write_mode`` per source: the embedded and CIFAR images are tiny (raw is smaller
#: to decode and bit-exact); an ImageFolder of photos is written as ffcv-imagenet does.
DEFAULT_WRITE_MODE = {"embedded": "raw", "cifar": "raw", "imagefolder": "proportion", "cityscapes": "raw"}
#: Samples per writer work unit per source (``WriteOptions.chunk_size`` None): Cityscapes samples
#: are 8 MiB raw, so its units are small to bound each writer process's memory.
DEFAULT_CHUNK_SIZE = {"embedded": 100, "cifar": 100, "imagefolder": 100, "cityscapes": 16}
#: The keyword arguments :func:`write` takes per source format (the source's own settings).
SOURCE_ARGS = {
    "embedded": ("split", "size", "num_classes", "per_class", "seed"),
    "cifar": ("source", "split"),
    "imagefolder": ("source", "max_resolution", "on_error"),
    "cityscapes": ("source", "split"),
}


@dataclass
class WriteOptions:
    """The FFCV ``RGBImageField`` and ``DatasetWriter`` options shared by every source."""

    write_mode: Optional[str] = None  # None: DEFAULT_WRITE_MODE of the source
    compress_probability: float = 0.5
    jpeg_quality: int = 90
    num_workers: Optional[int] = None  # None: all CPU cores
    chunk_size: Optional[int] = None  # None: DEFAULT_CHUNK_SIZE of the source
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


def write(source_format: str, output, options: Optional[WriteOptions] = None, *,
          progress: Optional[Callable[[str, int, int], None]] = None, **settings) -> WriteResult:
    """Write one dataset to a ``.beton`` file.

    Args:
        source_format: ``"embedded"``, ``"cifar"``, ``"imagefolder"`` or ``"cityscapes"``.
        output: the ``.beton`` file to write (written to a temporary file next to it and renamed
            into place when complete).
        options: the image encoding and writer options (default: :class:`WriteOptions`).
        progress: called as ``progress(stage, done, total)`` during the long passes before the
            write: ``"generating images"`` (embedded) and ``"checking images"`` (imagefolder).
        **settings: the source's settings (:data:`SOURCE_ARGS`): embedded ``split`` (``train`` or
            ``val``), ``size``, ``num_classes``, ``per_class`` (default: the split's count of
            :class:`~kdengine.data.embedded.EmbeddedSpec`), ``seed``; cifar ``source`` (the
            directory) and ``split`` (``train`` or ``test``); imagefolder ``source`` (the root),
            ``max_resolution`` and ``on_error`` (``fail`` or ``skip``); cityscapes ``source`` (the
            root with ``leftImg8bit/`` and ``gtFine/``) and ``split`` (``train``, ``val``, ...).

    Returns:
        A :class:`WriteResult`.

    Raises:
        SettingError: a bad setting, named as above.
        FileNotFoundError: a missing source.
        kdengine.data.beton.OutputExistsError: ``output`` exists and ``options.overwrite`` is off.
        kdengine.data.beton.UnreadableImageError: an unreadable image with ``on_error="fail"``.
        ImportError: FFCV is not installed.
    """
    from . import beton

    if source_format not in SOURCE_FORMATS:
        raise SettingError("source_format", f"must be one of {SOURCE_FORMATS}, got {source_format!r}")
    unknown = sorted(set(settings) - set(SOURCE_ARGS[source_format]))
    if unknown:
        raise TypeError(f"write({source_format!r}): unexpected settings {unknown}; "
                        f"it takes {SOURCE_ARGS[source_format]}")
    if "source" in SOURCE_ARGS[source_format] and settings.get("source") is None:
        raise SettingError("source", f"is required for {source_format!r} (the directory to read)")
    options = options or WriteOptions()
    mode = options.write_mode or DEFAULT_WRITE_MODE[source_format]
    chunk = DEFAULT_CHUNK_SIZE[source_format] if options.chunk_size is None else options.chunk_size
    common = dict(overwrite=options.overwrite, write_mode=mode, jpeg_quality=options.jpeg_quality,
                  compress_probability=options.compress_probability, num_workers=options.num_workers,
                  chunk_size=chunk)

    def stage(name: str):
        return None if progress is None else lambda done, total: progress(name, done, total)

    start = time.perf_counter()
    skipped = []
    if source_format == "embedded":
        spec, split = _embedded_spec(**settings)
        path = beton.write_embedded(spec, split, output, progress=stage("generating images"), **common)
    elif source_format == "cityscapes":
        from .cityscapes import write_cityscapes

        common.pop("compress_probability")
        path = write_cityscapes(settings["source"], settings.get("split", "train"), output,
                                progress=stage("checking images"), **common)
    elif source_format == "cifar":
        path = beton.write_cifar(settings["source"], settings.get("split", "train"), output, **common)
    else:
        path, skipped = beton.write_image_folder(settings["source"], output, progress=stage("checking images"),
                                                 max_resolution=settings.get("max_resolution"),
                                                 on_error=settings.get("on_error", "fail"), **common)
    return _result(path, source_format, start, mode, skipped)


def _embedded_spec(split: str = "train", size: int = 32, num_classes: int = 10, per_class: Optional[int] = None,
                   seed: int = 0):
    """``(EmbeddedSpec, split)`` of the embedded source's settings; ``per_class`` sets the count
    of the split written (the other split's count is irrelevant to this file)."""
    from .embedded import EmbeddedSpec

    counts = {}
    if per_class is not None:
        if per_class < 1:
            raise SettingError("per_class", f"must be at least 1, got {per_class}")
        counts = {"train_per_class" if split == "train" else "val_per_class": per_class}
    spec = EmbeddedSpec(num_classes=num_classes, size=size, seed=seed, **counts)  # checks its fields
    spec.count(split)  # checks the split
    return spec, split


def _result(path, source_format, start, mode, skipped=()) -> WriteResult:
    from ffcv.reader import Reader

    path = Path(path)
    return WriteResult(path=path, source_format=source_format, samples=int(Reader(str(path)).num_samples),
                       size_bytes=path.stat().st_size, seconds=time.perf_counter() - start,
                       write_mode=mode, skipped=list(skipped))


def format_size(n: int) -> str:
    """A byte count for people.

    Args:
        n: bytes.

    Returns:
        ``"512 B"``, ``"1.5 KiB"``, ... ``"2.0 GiB"``.
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
