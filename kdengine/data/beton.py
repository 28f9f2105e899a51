"""Writing datasets to FFCV ``.beton`` files, safely: a file at the destination path is always
complete. Each writer fills a temporary file next to the destination and renames it into place
only when FFCV has finished; an existing destination is refused unless ``overwrite=True``.

This module holds the embedded dataset's writer and its on-disk cache; the ImageFolder and CIFAR
writers and the loaders build on the same ``atomic_beton`` helper.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .embedded import EmbeddedSpec, cache_dir, generate

WRITE_MODES = ("raw", "jpg", "proportion", "smart")


@contextlib.contextmanager
def atomic_beton(path: os.PathLike | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces ``path``, on failure it is removed
    and ``path`` is left as it was."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _IndexedArrays:
    """The ``(image, label, mask)`` tuples FFCV's ``from_indexed_dataset`` reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, masks: np.ndarray):
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), self.masks[i]


def write_embedded(
    spec: EmbeddedSpec,
    split: str,
    path: os.PathLike | str,
    *,
    overwrite: bool = False,
    write_mode: str = "raw",
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    num_workers: Optional[int] = None,
    chunk_size: int = 100,
) -> Path:
    """Generate one split of the embedded dataset and write it to ``path`` with the fields
    ``image`` (RGB), ``label`` (int) and ``mask`` (``uint8 [S, S]`` foreground mask).

    ``write_mode``: ``"raw"`` (bit-exact, the default: the images are tiny), ``"jpg"``,
    ``"proportion"`` (JPEG with probability ``compress_probability``) or ``"smart"``.
    """
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_embedded: write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"write_embedded: jpeg_quality must be in [1, 100], got {jpeg_quality}")
    workers = num_workers or os.cpu_count() or 1
    images, labels, masks = generate(spec, split, workers=workers)
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=spec.size,
                               compress_probability=compress_probability, jpeg_quality=jpeg_quality),
        "label": IntField(),
        "mask": NDArrayField(dtype=np.dtype("uint8"), shape=(spec.size, spec.size)),
    }
    with atomic_beton(path, overwrite=overwrite) as tmp:
        writer = DatasetWriter(str(tmp), fields, num_workers=workers)
        writer.from_indexed_dataset(_IndexedArrays(images, labels, masks), chunksize=chunk_size)
    return Path(path)


def embedded_beton(spec: EmbeddedSpec = EmbeddedSpec(), split: str = "train") -> Path:
    """The ``.beton`` of one split, written on first use under ``cache_dir()/<spec.key()>/``."""
    path = cache_dir() / spec.key() / f"{split}.beton"
    if not path.exists():
        try:
            write_embedded(spec, split, path)
        except FileExistsError:  # another process finished it first
            pass
    return path
