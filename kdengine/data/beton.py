"""Writing datasets to FFCV ``.beton`` files, safely: a file at the destination path is always
complete. Each writer fills a temporary file next to the destination and renames it into place
only when FFCV has finished; an existing destination is refused unless ``overwrite=True``.

Writers: the embedded dataset (and its on-disk cache), the CIFAR python-pickle layout and
ImageFolder trees; :mod:`kdengine.data.loaders` reads what they write. Every writer stores an
``index`` field (``int``, the sample's position in the file) last, because FFCV's loader does not
report which samples a batch holds.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from ..errors import SettingError
from .embedded import EmbeddedSpec, cache_dir, generate

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
ON_ERROR = ("fail", "skip")

#: The layout of the files the writers produce; part of the embedded cache's file name, so a cached
#: file from an older layout (version 1 had no ``index`` field) is never reused.
BETON_VERSION = 2


class OutputExistsError(FileExistsError):
    """The output file exists and ``overwrite`` was not set.

    Args:
        path: the existing file.
    """

    def __init__(self, path: os.PathLike | str):
        super().__init__(f"{path} exists; pass overwrite=True to replace it")
        self.path = Path(path)


class UnreadableImageError(ValueError):
    """An ImageFolder tree holds images PIL cannot decode and ``on_error="fail"``.

    Args:
        skipped: the ``(file, reason)`` pairs of every unreadable image (at least one).
    """

    def __init__(self, skipped: list):
        self.skipped = list(skipped)
        self.path, self.reason = self.skipped[0]
        super().__init__(f"unreadable image {self.path} ({self.reason}); {len(self.skipped)} in all; "
                         "on_error='skip' leaves them out")


def check_output(path: os.PathLike | str, overwrite: bool) -> None:
    """Check, before any work, that a writer may write its output.

    Args:
        path: the output file.
        overwrite: whether an existing file may be replaced.

    Raises:
        IsADirectoryError: ``path`` is a directory.
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a directory; give the .beton file's path")
    if path.exists() and not overwrite:
        raise OutputExistsError(path)


def check_write_options(*, write_mode: str, jpeg_quality: int, compress_probability: float,
                        num_workers: Optional[int], chunk_size: int) -> None:
    """The checks of the FFCV ``RGBImageField`` / ``DatasetWriter`` options every writer takes.

    Raises:
        SettingError: naming the first bad option.
    """
    if write_mode not in WRITE_MODES:
        raise SettingError("write_mode", f"must be one of {WRITE_MODES}, got {write_mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise SettingError("jpeg_quality", f"must be in [1, 100], got {jpeg_quality}")
    if not 0.0 <= compress_probability <= 1.0:
        raise SettingError("compress_probability", f"must be in [0, 1], got {compress_probability}")
    if num_workers is not None and num_workers < 1:
        raise SettingError("num_workers", f"must be at least 1, got {num_workers}")
    if chunk_size < 1:
        raise SettingError("chunk_size", f"must be at least 1, got {chunk_size}")


@contextlib.contextmanager
def atomic_beton(path: os.PathLike | str, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path to write next to ``path``: on success it replaces ``path``, on failure it
    is removed and ``path`` is left as it was.

    Args:
        path: the final file.
        overwrite: whether an existing file may be replaced (checked by :func:`check_output`).

    Yields:
        The temporary path.
    """
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _IndexedArrays:
    """The ``(image, label[, mask], index)`` tuples FFCV's ``from_indexed_dataset`` reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, masks: Optional[np.ndarray] = None):
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.masks is None:
            return self.images[i], int(self.labels[i]), i
        return self.images[i], int(self.labels[i]), self.masks[i], i


def _write_indexed(path, fields: dict, dataset, *, overwrite: bool, num_workers: int,
                   chunk_size: int) -> Path:
    """Write an indexed dataset (``len`` + ``[i]`` -> one tuple per sample, in ``fields``'
    order) to ``path`` through FFCV, atomically."""
    from ffcv.writer import DatasetWriter

    with atomic_beton(path, overwrite=overwrite) as tmp:
        writer = DatasetWriter(str(tmp), fields, num_workers=num_workers)
        writer.from_indexed_dataset(dataset, chunksize=chunk_size)
    return Path(path)


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
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Generate one split of the embedded dataset and write it to ``path`` with the fields
    ``image`` (RGB), ``label`` (int), ``mask`` (``uint8 [S, S]`` foreground mask) and ``index``.

    Args:
        spec: the dataset's parameters.
        split: ``"train"`` or ``"val"``.
        path: the ``.beton`` file to write.
        overwrite: replace an existing file (else :class:`OutputExistsError`).
        write_mode: ``"raw"`` (bit-exact, the default: the images are tiny), ``"jpg"``,
            ``"proportion"`` (JPEG with probability ``compress_probability``) or ``"smart"``.
        jpeg_quality: JPEG quality, 1-100.
        compress_probability: share of JPEG images in ``"proportion"`` mode.
        num_workers: generator threads and writer processes (default: the CPU count).
        chunk_size: samples per writer work unit.
        progress: called as ``progress(done, total)`` while the images are generated.

    Returns:
        ``path``.
    """
    from ffcv.fields import IntField, NDArrayField, RGBImageField

    check_write_options(write_mode=write_mode, jpeg_quality=jpeg_quality,
                        compress_probability=compress_probability, num_workers=num_workers, chunk_size=chunk_size)
    check_output(path, overwrite)  # before the generation, not only when the file is opened
    workers = num_workers or os.cpu_count() or 1
    images, labels, masks = generate(spec, split, workers=workers, progress=progress)
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=spec.size,
                               compress_probability=compress_probability, jpeg_quality=jpeg_quality),
        "label": IntField(),
        "mask": NDArrayField(dtype=np.dtype("uint8"), shape=(spec.size, spec.size)),
        "index": IntField(),
    }
    return _write_indexed(path, fields, _IndexedArrays(images, labels, masks), overwrite=overwrite,
                          num_workers=workers, chunk_size=chunk_size)


def embedded_beton(spec: EmbeddedSpec = EmbeddedSpec(), split: str = "train") -> Path:
    """The ``.beton`` of one split, written on first use under ``cache_dir()/<spec.key()>/``; the
    file name carries :data:`BETON_VERSION`."""
    path = cache_dir() / spec.key() / f"{split}-beton{BETON_VERSION}.beton"
    if not path.exists():
        try:
            write_embedded(spec, split, path)
        except FileExistsError:  # another process finished it first
            pass
    return path


# ---------------------------------------------------------------------------------- CIFAR


CIFAR_LAYOUTS = {
    # directory name: (train files, test files, meta file, label key, label-names key)
    "cifar-10-batches-py": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                            b"labels", b"label_names"),
    "cifar-100-python": (["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    import pickle

    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({exc})") from exc


def read_cifar(source: os.PathLike | str, split: str):
    """``(images uint8 [N, 32, 32, 3], labels int64 [N], class_names)`` of the ``train`` or
    ``test`` split of a CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``)
    python-pickle directory."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"CIFAR source {source} is not a directory")
    layout = CIFAR_LAYOUTS.get(source.name)
    if layout is None:  # name unknown: recognise the layout by its files
        layout = next((v for v in CIFAR_LAYOUTS.values() if (source / v[2]).exists()), None)
    if layout is None:
        raise FileNotFoundError(
            f"{source}: no CIFAR layout found (expected batches.meta + data_batch_* or meta + train/test)")
    train_files, test_files, meta_file, label_key, names_key = layout
    if split not in ("train", "test"):
        raise SettingError("split", f"must be 'train' or 'test', got {split!r}")
    files = [source / name for name in (train_files if split == "train" else test_files)]
    missing = [str(p) for p in files + [source / meta_file] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"CIFAR source {source} lacks {missing}")
    images, labels = [], []
    for path in files:
        batch = _unpickle(path)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"{path}: no {b'data'!r} / {label_key!r} entries")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: data must be [N, 3072] uint8, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(source / meta_file)[names_key]]
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names


def write_cifar(
    source: os.PathLike | str,
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
    """Write a CIFAR split (python-pickle layout) to ``path`` with fields ``image``, ``label`` and
    ``index``.

    Args:
        source: the extracted ``cifar-10-batches-py`` or ``cifar-100-python`` directory.
        split: ``"train"`` or ``"test"``.
        path: the ``.beton`` file to write.
        overwrite, write_mode, jpeg_quality, compress_probability, num_workers, chunk_size: as
            for :func:`write_embedded`.

    Returns:
        ``path``.
    """
    from ffcv.fields import IntField, RGBImageField

    check_write_options(write_mode=write_mode, jpeg_quality=jpeg_quality,
                        compress_probability=compress_probability, num_workers=num_workers, chunk_size=chunk_size)
    check_output(path, overwrite)
    images, labels, _ = read_cifar(source, split)
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=32,
                               compress_probability=compress_probability, jpeg_quality=jpeg_quality),
        "label": IntField(),
        "index": IntField(),
    }
    return _write_indexed(path, fields, _IndexedArrays(images, labels), overwrite=overwrite,
                          num_workers=num_workers or os.cpu_count() or 1, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------- ImageFolder


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def scan_image_folder(root: os.PathLike | str) -> tuple[list, list]:
    """``(files, class_names)`` of an ImageNet-style tree (one folder per class, sorted); ``files``
    holds ``(path, label)``. A missing or empty root, or a class folder without images, raises."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder source {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"ImageFolder source {root} has no class folders")
    files = []
    for label, name in enumerate(classes):
        images = sorted(p for p in (root / name).iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise ValueError(f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.extend((p, label) for p in images)
    return files, classes


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _unreadable(files: list, workers: int, progress: Optional[Callable[[int, int], None]] = None) -> list:
    """The files PIL cannot decode, each with the reason, found by decoding all of them;
    ``progress(done, total)`` is called after each file."""
    from concurrent.futures import ThreadPoolExecutor

    def check(item):
        try:
            _load_rgb(item[0])
            return None
        except Exception as exc:  # PIL raises many types for bad files
            return item[0], f"{type(exc).__name__}: {exc}"

    bad = []
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        for done, result in enumerate(pool.map(check, files), 1):
            if result is not None:
                bad.append(result)
            if progress is not None:
                progress(done, len(files))
    return bad


class _ImageFiles:
    def __init__(self, files: list):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        return _load_rgb(path), label, i


def write_image_folder(
    root: os.PathLike | str,
    path: os.PathLike | str,
    *,
    overwrite: bool = False,
    max_resolution: Optional[int] = None,
    write_mode: str = "proportion",
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    on_error: str = "fail",
    num_workers: Optional[int] = None,
    chunk_size: int = 100,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[Path, list]:
    """Write an ImageFolder tree to ``path`` (fields ``image``, ``label``, ``index``; labels are the
    sorted class folders' indices). Every image is decoded once first, so an unreadable file is
    found before writing starts.

    Args:
        root: the folder holding one folder of images per class.
        path: the ``.beton`` file to write.
        max_resolution: downscale images whose longer side exceeds it (None: keep the size).
        on_error: an unreadable image raises :class:`UnreadableImageError` (``"fail"``) or is
            left out and reported (``"skip"``).
        progress: called as ``progress(done, total)`` during the decode pass (FFCV's writer
            shows its own bar for the write itself).
        overwrite, write_mode, jpeg_quality, compress_probability, num_workers, chunk_size: as
            for :func:`write_embedded` (``write_mode`` defaults to ``"proportion"`` here).

    Returns:
        ``(path, skipped)``, ``skipped`` the ``(file, reason)`` pairs left out.
    """
    from ffcv.fields import IntField, RGBImageField

    check_write_options(write_mode=write_mode, jpeg_quality=jpeg_quality,
                        compress_probability=compress_probability, num_workers=num_workers, chunk_size=chunk_size)
    if max_resolution is not None and max_resolution < 1:
        raise SettingError("max_resolution", f"must be at least 1, got {max_resolution}")
    if on_error not in ON_ERROR:
        raise SettingError("on_error", f"must be one of {ON_ERROR}, got {on_error!r}")
    check_output(path, overwrite)  # refuse before the long decode pass
    workers = num_workers or os.cpu_count() or 1
    files, _ = scan_image_folder(root)
    skipped = _unreadable(files, workers, progress)
    if skipped and on_error == "fail":
        raise UnreadableImageError(skipped)
    bad_paths = {p for p, _ in skipped}
    files = [item for item in files if item[0] not in bad_paths]
    if not files:
        raise ValueError(f"ImageFolder source {root}: no readable images")
    image_field = RGBImageField(write_mode=write_mode, jpeg_quality=jpeg_quality,
                                compress_probability=compress_probability,
                                **({"max_resolution": max_resolution} if max_resolution else {}))
    fields = {"image": image_field, "label": IntField(), "index": IntField()}
    written = _write_indexed(path, fields, _ImageFiles(files), overwrite=overwrite, num_workers=workers,
                             chunk_size=chunk_size)
    return written, skipped
