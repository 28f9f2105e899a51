"""Cityscapes for semantic segmentation: the 19 training classes, the official labelId -> train-id
mapping, a scan of the standard directory layout and a writer of a split to an FFCV ``.beton``.

The user supplies the data (download requires registration at cityscapes-dataset.com; nothing is
downloaded here). The layout is the one the official archives unpack to::

    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The ``.beton`` has the fields ``image`` (RGB), ``label`` (the train-id map, ``uint8 [H, W]``,
stored raw: lossless; 255 where ignored) and ``index`` (the sample's position in
:func:`scan_cityscapes`' order, which is also its position in the file).
:func:`kdengine.data.segmentation.make_segmentation_loader` reads it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..errors import SettingError
from .beton import atomic_beton, check_output, check_write_options

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_WRITE_MODES", "IGNORE_INDEX", "LABEL_ID_TO_TRAIN_ID", "scan_cityscapes",
           "to_train_ids", "write_cityscapes"]

#: The 19 classes Cityscapes is evaluated on, in train-id order (cityscapesScripts' labels.py).
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
#: The label value of pixels no loss or metric counts (void classes, padding).
IGNORE_INDEX = 255
#: labelIds of the 19 evaluated classes, in train-id order (cityscapesScripts' labels.py: every
#: other id, void and the classes with ``ignoreInEval``, has trainId 255).
_EVALUATED_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def _label_table() -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[list(_EVALUATED_LABEL_IDS)] = np.arange(len(_EVALUATED_LABEL_IDS), dtype=np.uint8)
    table.setflags(write=False)
    return table


#: ``uint8 [256]``: a labelIds value -> its train id (0..18), or 255 for every other value.
LABEL_ID_TO_TRAIN_ID = _label_table()
#: ``write_mode`` values of :func:`write_cityscapes` (the image field; labels are always raw).
CITYSCAPES_WRITE_MODES = ("raw", "jpg")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
#: PIL modes a labelIds file may have: one 8-bit channel whose values are the label ids.
LABEL_MODES = ("L", "P")


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a labelIds image to train ids.

    Args:
        label_ids: uint8 array of Cityscapes labelIds (any shape).

    Returns:
        uint8 array of the same shape: train ids 0..18, 255 elsewhere.

    Raises:
        ValueError: ``label_ids`` is not uint8.
    """
    label_ids = np.asarray(label_ids)
    if label_ids.dtype != np.uint8:
        raise ValueError(f"label_ids must be uint8 labelIds, got {label_ids.dtype} {label_ids.shape}")
    return LABEL_ID_TO_TRAIN_ID[label_ids]


def scan_cityscapes(root: Union[str, os.PathLike], split: str) -> list[tuple[Path, Path]]:
    """The (image, label) file pairs of one split, sorted by city then name.

    Args:
        root: the Cityscapes root (holding ``leftImg8bit/`` and ``gtFine/``).
        split: a split folder name: ``"train"``, ``"val"`` or ``"test"`` (the official test
            labels are all void).

    Returns:
        ``[(root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png,
        root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png), ...]``.

    Raises:
        FileNotFoundError: a missing root, split folder, or label file of an image (the first, by
            its expected path).
        ValueError: a bad ``split`` name, or a split without images.
    """
    root = Path(root)
    if not isinstance(split, str) or not split or split in (".", "..") or "/" in split or os.sep in split:
        raise ValueError(f"split must be a split folder name such as 'train' or 'val', got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"root: Cityscapes root {str(root)!r} is not a directory")
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"split {split!r}: no folder {str(folder)!r} (expected root/leftImg8bit/<split>/ "
                                    "and root/gtFine/<split>/, as the official archives unpack)")
    images = sorted(p for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}") if p.is_file())
    if not images:
        raise ValueError(f"split {split!r}: no images in {str(image_dir)!r} (expected <city>/*{IMAGE_SUFFIX})")
    pairs = []
    for image in images:
        name = image.name[: -len(IMAGE_SUFFIX)]
        label = label_dir / image.parent.name / f"{name}{LABEL_SUFFIX}"
        if not label.is_file():
            raise FileNotFoundError(f"image {str(image)!r} has no label file {str(label)!r}")
        pairs.append((image, label))
    return pairs


def _check_headers(pairs: list, progress: Optional[Callable[[int, int], None]]) -> tuple[int, int]:
    """``(height, width)`` shared by every image and label, from the files' headers (PIL reads no
    pixel data to open a file), so a bad file is named before the writer's processes start (an
    error inside them would hang FFCV's writer)."""
    from PIL import Image, UnidentifiedImageError

    size = None
    for done, (image, label) in enumerate(pairs, 1):
        try:
            with Image.open(image) as img:
                img_size = img.size
            with Image.open(label) as lab:
                lab_size, lab_mode = lab.size, lab.mode
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"unreadable file in pair ({str(image)!r}, {str(label)!r}): {exc}") from None
        if lab_mode not in LABEL_MODES:
            raise ValueError(f"label {str(label)!r} has PIL mode {lab_mode!r}; expected a single-channel "
                             f"labelIds PNG (mode {' or '.join(LABEL_MODES)}), not e.g. the *_color.png")
        if lab_size != img_size:
            raise ValueError(f"label {str(label)!r} is {lab_size[1]}x{lab_size[0]} but its image "
                             f"{str(image)!r} is {img_size[1]}x{img_size[0]}")
        if size is None:
            size = img_size
        elif img_size != size:
            raise ValueError(f"image {str(image)!r} is {img_size[1]}x{img_size[0]} but {str(pairs[0][0])!r} is "
                             f"{size[1]}x{size[0]}: a .beton's label field has one [H, W] shape, so every image "
                             "of a split must share one size (Cityscapes: 1024x2048)")
        if progress is not None:
            progress(done, len(pairs))
    return size[1], size[0]


def _read_pair(image: Path, label: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 RGB [H, W, 3], uint8 train ids [H, W])`` of one pair."""
    from PIL import Image

    with Image.open(image) as img:
        rgb = np.asarray(img.convert("RGB"))
    with Image.open(label) as lab:
        ids = np.asarray(lab)
    return rgb, to_train_ids(ids)


class _CityscapesPairs:
    """The ``(image, label, index)`` samples FFCV's writer reads in its worker processes.

    A pair that fails to decode is written as a void sample and its index recorded in the shared
    ``failed`` value; the writer then raises naming the file (an exception inside FFCV's workers
    would leave its main process waiting forever)."""

    def __init__(self, pairs: list, height: int, width: int):
        import multiprocessing

        self.pairs, self.height, self.width = pairs, height, width
        self.failed = multiprocessing.Value("q", -1)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        try:
            rgb, train_ids = _read_pair(*self.pairs[i])
            if rgb.shape[:2] != (self.height, self.width) or train_ids.shape != (self.height, self.width):
                raise ValueError("decoded size differs from the header's")
        except Exception:  # any decode failure: reported by the main process after the write
            with self.failed.get_lock():
                if self.failed.value < 0:
                    self.failed.value = i
            rgb = np.zeros((self.height, self.width, 3), dtype=np.uint8)
            train_ids = np.full((self.height, self.width), IGNORE_INDEX, dtype=np.uint8)
        return rgb, train_ids, i


def _page_size(height: int, width: int, write_mode: str) -> int:
    """FFCV's page size: a power of two that holds the largest field of a sample (a raw image, or a
    JPEG, which for noise-like content can exceed the raw size), at least FFCV's default 8 MiB."""
    largest = height * width * 3 * (2 if write_mode == "jpg" else 1) + 4096
    size = 1 << 23
    while size < largest:
        size <<= 1
    return size


def write_cityscapes(
    root: Union[str, os.PathLike],
    split: str,
    output: Union[str, os.PathLike],
    *,
    num_workers: Optional[int] = None,
    jpeg_quality: int = 90,
    write_mode: str = "raw",
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    chunk_size: int = 16,
) -> Path:
    """Write one Cityscapes split to a ``.beton`` with the fields ``image`` (RGB), ``label`` (train
    ids, ``uint8 [H, W]``, raw: lossless) and ``index`` (the position in :func:`scan_cityscapes`).

    The default ``write_mode="raw"`` keeps the images bit-exact to the PNGs the published results
    were trained on, and makes decoding a copy (a JPEG decode of a 2-megapixel frame costs several
    milliseconds of CPU per image, at 8-16 images a step); the price is disk: 8 MiB per sample at
    1024x2048 (6 MiB image, 2 MiB label), about 23 GiB for ``train`` and 4 GiB for ``val``.
    ``"jpg"`` (at ``jpeg_quality``) shrinks the image part about tenfold but is lossy; the labels
    stay raw either way.

    Args:
        root: the Cityscapes root (see :func:`scan_cityscapes`).
        split: the split folder, e.g. ``"train"`` or ``"val"``.
        output: the ``.beton`` file (written next to it under a temporary name, then renamed).
        num_workers: FFCV writer processes (default: the CPU count).
        jpeg_quality: JPEG quality 1-100 for ``write_mode="jpg"``.
        write_mode: ``"raw"`` or ``"jpg"`` (the image field).
        overwrite: replace an existing ``output`` (else :class:`~.beton.OutputExistsError`).
        progress: called as ``progress(done, total)`` while the files' headers are checked (FFCV's
            writer shows its own bar for the write).
        chunk_size: samples per writer work unit.

    Returns:
        ``output`` as a Path.

    Raises:
        SettingError: a bad ``write_mode``, ``jpeg_quality``, ``num_workers`` or ``chunk_size``.
        OutputExistsError: ``output`` exists and ``overwrite`` is False.
        FileNotFoundError, ValueError: from :func:`scan_cityscapes`; an unreadable file, a label
            that is not a single-channel labelIds image, a label whose size differs from its
            image's, or images of more than one size (the label field has one fixed shape).
    """
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    if write_mode not in CITYSCAPES_WRITE_MODES:
        raise SettingError("write_mode", f"must be one of {CITYSCAPES_WRITE_MODES}, got {write_mode!r}")
    check_write_options(write_mode=write_mode, jpeg_quality=jpeg_quality, compress_probability=0.0,
                        num_workers=num_workers, chunk_size=chunk_size)
    check_output(output, overwrite)  # before the scan and the header pass
    pairs = scan_cityscapes(root, split)
    height, width = _check_headers(pairs, progress)
    dataset = _CityscapesPairs(pairs, height, width)
    fields = {
        "image": RGBImageField(write_mode=write_mode, jpeg_quality=jpeg_quality),
        "label": NDArrayField(dtype=np.dtype("uint8"), shape=(height, width)),
        "index": IntField(),
    }
    workers = min(num_workers or os.cpu_count() or 1, len(pairs))
    with atomic_beton(output, overwrite=overwrite) as tmp:
        writer = DatasetWriter(str(tmp), fields, num_workers=workers, page_size=_page_size(height, width, write_mode))
        writer.from_indexed_dataset(dataset, chunksize=chunk_size)
        if dataset.failed.value >= 0:
            image, label = pairs[dataset.failed.value]
            try:
                _read_pair(image, label)
                reason = "its decoded size differs from its header's"
            except Exception as exc:  # the decoder's own message
                reason = f"{type(exc).__name__}: {exc}"
            raise ValueError(f"cannot decode the pair ({str(image)!r}, {str(label)!r}): {reason}; nothing written")
    return Path(output)
