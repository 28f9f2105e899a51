"""Loaders for semantic segmentation: images with a label map per pixel, from a ``.beton`` written
by :func:`kdengine.data.cityscapes.write_cityscapes` (fields ``image``, ``label`` ``uint8 [H, W]``,
``index``) or from in-memory arrays.

Pipelines (``pipeline=``):

* ``seg_train``: :func:`seg_train_transform`, the recipe of mmseg and CIRKD: a random scale in
  ``scale_range`` (bilinear for the image, nearest for the labels), a random ``crop_size`` crop,
  padded at the bottom / right where the scaled image is smaller (the image with the ``mean``
  colour, which normalises to 0, the labels with ``ignore_index``), a random horizontal flip.
  Yields ``(images, labels, indices)``.
* ``seg_val``: whole images at their stored resolution, no augmentation, sequential order.
  Yields ``(images, labels)``.

``images`` float ``[B, 3, h, w]``, ``(x - mean) / std`` per channel in 0..255 units, on ``device``
in ``dtype`` (channels_last memory when asked); ``labels`` int64 ``[B, h, w]`` (``ignore_index``
where ignored); ``indices`` int64 ``[B]``, the samples' positions in the file or arrays. Every
tensor is fresh.

The augmentation runs batched on the device, the same for every source, so a ``.beton`` read
through FFCV, the same file held on the device and the arrays it was written from give the same
batches. It is deterministic: the epoch order is a function of ``(seed, epoch)`` (the
classification loaders' :func:`~kdengine.data.epoch_order` and sharding) and each batch's draws of
``(seed, epoch, rank, world_size, batch index)``, taken from a CPU ``torch.Generator``, so
``set_epoch(epoch, start_batch)`` resumes exactly and the CPU and a GPU draw the same crops.

``device_resident="auto"`` holds the decoded set (4 bytes a pixel: RGB and the label, plus 8 a
sample) on the device when it fits :func:`kdengine.data.resident_budget` (2 GiB on the CPU, a
quarter of a GPU's free memory: Cityscapes' 2975 training frames take 23 GiB, which an 80 GB GPU
does not give, an H200 does); otherwise FFCV streams the file (raw pixels, decoded to the device
per batch). In-memory arrays stay on the host when they do not fit, and each batch moves over.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ._loading import (
    AUGMENT_STREAM,
    IMAGENET_MEAN,
    KDLoader,
    LoaderConfig,
    Normalizer,
    beton_info,
    epoch_batches,
    epoch_order,
    seed_for,
    shard,
)
from .cityscapes import IGNORE_INDEX
from .loaders import resident_budget

__all__ = ["SEG_ORDERS", "SEG_PIPELINES", "SegmentationConfig", "SegmentationLoader", "make_segmentation_loader",
           "seg_train_transform", "segmentation_resident_bytes"]

#: The segmentation pipelines (``make_segmentation_loader(pipeline=...)``).
SEG_PIPELINES = ("seg_train", "seg_val")
#: The epoch orders (FFCV's page-local ``quasi_random`` is not offered: the device-resident path
#: and the streaming path must draw the same order).
SEG_ORDERS = ("random", "sequential")
#: Fields a segmentation ``.beton`` must have.
SEG_FIELDS = ("image", "label", "index")
#: Bytes per batch FFCV decodes while a ``.beton`` is read onto the device.
READ_CHUNK_BYTES = 256 << 20


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _pair(name: str, value, *, positive_ints: bool) -> tuple:
    """Two numbers (an int ``n`` means ``(n, n)`` for sizes), checked."""
    if positive_ints and _is_int(value):
        value = (value, value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (h, w) / (low, high), got {value!r}") from None
    if positive_ints:
        if not (_is_int(a) and _is_int(b) and a >= 1 and b >= 1):
            raise ValueError(f"{name} must be two positive ints (h, w), got {value!r}")
        return int(a), int(b)
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in (a, b)):
        raise ValueError(f"{name} must be two numbers (low, high), got {value!r}")
    return float(a), float(b)


def _check_scale_range(scale_range) -> tuple[float, float]:
    lo, hi = _pair("scale_range", scale_range, positive_ints=False)
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
    return lo, hi


def _check_ignore_index(ignore_index) -> int:
    if not _is_int(ignore_index) or not 0 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be an int in [0, 255] (labels are stored as uint8), got {ignore_index!r}")
    return int(ignore_index)


# ---------------------------------------------------------------------------------- the transform


def _axis_map(size_in: int, scaled: torch.Tensor, offset: torch.Tensor, n: int,
              reverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Where each of the ``n`` output positions of one axis reads from, per image.

    The output position ``p`` (after the flip, when ``reverse``) is the position ``offset + p`` of
    the image scaled to ``scaled`` pixels along this axis; beyond ``scaled`` it is padding. The
    source positions follow ``F.interpolate(size=...)`` with ``align_corners=False``: nearest
    (``"nearest-exact"``) ``floor((q + 0.5) * in / out)``, bilinear from ``(q + 0.5) * in / out - 0.5``
    clamped at 0.

    Returns:
        float64 ``[6, B, n]``: inside (1 / 0), nearest, bilinear low and high positions, and the
        high one's weight (exact integers in float64, so one transfer carries them all).
    """
    b = scaled.shape[0]
    pos = torch.arange(n, dtype=torch.float64).expand(b, n)
    if reverse is not None:
        pos = torch.where(reverse[:, None], n - 1 - pos, pos)
    q = offset[:, None] + pos  # position in the scaled image
    inside = q < scaled[:, None]
    # (q + 0.5) * in / out as one division of exact integers (all below 2**53): correctly rounded,
    # so a centre that falls exactly on a pixel boundary floors to that pixel
    out2 = 2 * scaled[:, None]
    nearest = ((2 * q + 1) * size_in / out2).floor().clamp_(max=size_in - 1)
    src = (((2 * q + 1) * size_in - scaled[:, None]) / out2).clamp_(min=0)
    low = src.floor().clamp_(max=size_in - 1)
    high = (low + 1).clamp_(max=size_in - 1)
    weight = torch.where(high > low, src - low, torch.zeros_like(src))
    return torch.stack([inside.double(), nearest, low, high, weight])


def _fill_colour(fill) -> tuple:
    try:
        values = tuple(float(v) for v in fill)
    except (TypeError, ValueError):
        raise ValueError(f"fill must be 3 numbers (an RGB colour in 0..255), got {fill!r}") from None
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"fill must be 3 numbers in [0, 255] (an RGB colour), got {fill!r}")
    return tuple(int(round(v)) for v in values)


def seg_train_transform(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    crop_size: Union[int, Sequence[int]],
    scale_range: Sequence[float] = (0.5, 2.0),
    flip: bool = True,
    ignore_index: int = IGNORE_INDEX,
    fill: Sequence[float] = IMAGENET_MEAN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale, pad, crop and horizontal flip of a batch of images and their label maps, on
    their device (mmseg's / CIRKD's training recipe).

    Per image: a scale ``s`` uniform in ``scale_range`` gives the size ``(int(H*s + 0.5),
    int(W*s + 0.5))`` (mmseg's rounding), the image resampled bilinearly and the labels by nearest
    neighbour (``F.interpolate(..., align_corners=False)`` without antialiasing, and
    ``"nearest-exact"``); a crop of ``crop_size`` at a uniform offset, the part beyond the scaled
    image (bottom / right) padded with ``fill`` and ``ignore_index``; then the crop flipped
    left-right with probability 1/2 (when ``flip``). All of it is one gather per batch: only the
    crop's pixels are computed. The draws, ``[B, 4]`` uniforms from ``generator`` (scale, top,
    left, flip), are the same whether ``flip`` is on or not.

    Args:
        images: uint8 ``[B, H, W, 3]``.
        labels: integer ``[B, H, W]`` on the same device (uint8 or int64).
        generator: a CPU generator, the only source of randomness.
        crop_size: ``(h, w)`` of the output (an int: square).
        scale_range: ``(low, high)``, ``0 < low <= high``.
        flip: draw random horizontal flips.
        ignore_index: the label of padded pixels.
        fill: the RGB colour of padded pixels, 0..255 (default: ImageNet's mean, which the
            loader's normalisation maps to about 0).

    Returns:
        ``(images uint8 [B, h, w, 3], labels int64 [B, h, w])`` on the images' device.

    Raises:
        ValueError: bad shapes, dtypes or options, named.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[3] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor [B, H, W, 3], got {getattr(images, 'dtype', None)} {shape}")
    b, height, width = images.shape[:3]
    if not isinstance(labels, torch.Tensor) or labels.shape != (b, height, width) \
            or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor [B, H, W] = [{b}, {height}, {width}] like the images, "
                         f"got {getattr(labels, 'dtype', None)} {shape}")
    if labels.device != images.device:
        raise ValueError(f"labels are on {labels.device} but images on {images.device}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")
    ch, cw = _pair("crop_size", crop_size, positive_ints=True)
    lo, hi = _check_scale_range(scale_range)
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be a bool, got {flip!r}")
    if not _is_int(ignore_index):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    fill = _fill_colour(fill)
    dev = images.device

    u = torch.rand((b, 4), generator=generator, dtype=torch.float64)
    scale = lo + (hi - lo) * u[:, 0]
    sh = (height * scale + 0.5).floor().clamp_(min=1)
    sw = (width * scale + 0.5).floor().clamp_(min=1)
    top = (u[:, 1] * ((sh - ch).clamp(min=0) + 1)).floor()
    left = (u[:, 2] * ((sw - cw).clamp(min=0) + 1)).floor()
    flipped = (u[:, 3] < 0.5) & flip
    rows = _axis_map(height, sh, top, ch).to(dev, non_blocking=True)
    cols = _axis_map(width, sw, left, cw, reverse=flipped).to(dev, non_blocking=True)
    row_in, row_near, y0, y1 = (rows[i].to(torch.int64) for i in range(4))
    col_in, col_near, x0, x1 = (cols[i].to(torch.int64) for i in range(4))
    wy, wx = rows[4].float()[:, :, None, None], cols[4].float()[:, None, :, None]

    bi = torch.arange(b, device=dev)[:, None, None]

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # [B, h, w, 3] float
        return images[bi, y[:, :, None], x[:, None, :]].float()

    # F.interpolate's bilinear sum, in its order: rows of column interpolations
    out = (at(y0, x0) * (1 - wx) + at(y0, x1) * wx) * (1 - wy) + (at(y1, x0) * (1 - wx) + at(y1, x1) * wx) * wy
    inside = (row_in.bool()[:, :, None] & col_in.bool()[:, None, :])  # [B, h, w]
    colour = torch.tensor(fill, dtype=out.dtype, device=dev)
    out = torch.where(inside[..., None], out.round_().clamp_(0, 255), colour).to(torch.uint8)
    lab = labels[bi, row_near[:, :, None], col_near[:, None, :]].to(torch.int64)
    lab = lab.masked_fill_(~inside, int(ignore_index))
    return out, lab


# ---------------------------------------------------------------------------------- options


@dataclass
class SegmentationConfig:
    """The checked options of :func:`make_segmentation_loader` (see there). The options it shares
    with the classification loaders are checked and resolved by :class:`~kdengine.data.LoaderConfig`
    (same rules, same messages)."""

    pipeline: str
    batch_size: int
    device: Union[str, torch.device] = "cpu"
    dtype: torch.dtype = torch.float32
    channels_last: Optional[bool] = None
    crop_size: Union[int, Sequence[int]] = (512, 1024)
    scale_range: Sequence[float] = (0.5, 2.0)
    flip: bool = True
    ignore_index: int = IGNORE_INDEX
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    seed: int = 0
    order: Optional[str] = None
    drop_last: Optional[bool] = None
    distributed: bool = False
    rank: Optional[int] = None
    world_size: Optional[int] = None
    num_workers: Optional[int] = None
    os_cache: bool = True
    batches_ahead: int = 3

    def __post_init__(self):
        if self.pipeline not in SEG_PIPELINES:
            raise ValueError(f"pipeline must be one of {SEG_PIPELINES}, got {self.pipeline!r}")
        if self.order is not None and self.order not in SEG_ORDERS:
            raise ValueError(f"order must be one of {SEG_ORDERS} or None, got {self.order!r}")
        shared = LoaderConfig(
            pipeline="cifar_val" if self.is_val else "cifar_train", batch_size=self.batch_size,
            num_workers=self.num_workers, device=self.device, dtype=self.dtype, channels_last=self.channels_last,
            order=self.order, drop_last=self.drop_last, distributed=self.distributed, seed=self.seed,
            os_cache=self.os_cache, mean=self.mean, std=self.std, rank=self.rank, world_size=self.world_size,
            batches_ahead=self.batches_ahead)
        for name in ("num_workers", "device", "channels_last", "order", "drop_last", "mean", "std", "rank",
                     "world_size"):
            setattr(self, name, getattr(shared, name))
        self.crop_size = _pair("crop_size", self.crop_size, positive_ints=True)
        self.scale_range = _check_scale_range(self.scale_range)
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip must be a bool, got {self.flip!r}")
        self.ignore_index = _check_ignore_index(self.ignore_index)

    @property
    def is_val(self) -> bool:
        return self.pipeline == "seg_val"

    def resolution_at(self, epoch: int) -> Optional[int]:
        """The crop height of ``seg_train`` (the same every epoch); None for ``seg_val`` (the
        images' height, which the loader knows)."""
        return None if self.is_val else self.crop_size[0]


def segmentation_resident_bytes(num_samples: int, height: int, width: int) -> int:
    """Bytes a segmentation set takes held on a device: RGB and a label byte a pixel, an int64
    index a sample."""
    return num_samples * (height * width * 4 + 8)


# ---------------------------------------------------------------------------------- sources


def _epoch_rows(config: SegmentationConfig, n: int, epoch: int) -> np.ndarray:
    """This rank's samples of ``epoch``, in batch order (cut to whole batches with ``drop_last``)."""
    order = epoch_order(n, config.order, config.seed, epoch)
    return epoch_batches(shard(order, config.rank, config.world_size, config.drop_last), config.batch_size,
                         config.drop_last)


class _Resident:
    """The set as tensors on ``store`` (the device, or the host when it does not fit there)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, store: torch.device):
        self.images = images.to(store)
        self.labels = labels.to(store, torch.uint8)
        self.indices = indices.to(store, torch.int64)
        self.store = store

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[:3])

    def batches(self, config: SegmentationConfig, epoch: int, start: int, count: int) -> Iterator[tuple]:
        rows = torch.from_numpy(np.ascontiguousarray(_epoch_rows(config, self.size[0], epoch))).to(self.store)
        bs, dev = config.batch_size, config.device
        for b in range(start, count):
            sel = rows[b * bs:(b + 1) * bs]
            yield (self.images[sel].to(dev, non_blocking=True), self.labels[sel].to(dev, non_blocking=True),
                   self.indices[sel].to(dev, non_blocking=True))


def _order_class():
    """FFCV's ``TraversalOrder`` that follows :func:`_epoch_rows` from a start batch (built on
    first use: FFCV is imported lazily, it is absent where only in-memory sources are read)."""
    from ffcv.traversal_order.base import TraversalOrder

    class EpochRows(TraversalOrder):
        def __init__(self, config: SegmentationConfig, n: int):
            self.config, self.n, self.start_batch = config, n, 0

        def __call__(self, ffcv_loader):  # FFCV's Loader calls `order(self)` on a TraversalOrder instance
            self.loader, self.indices, self.seed = ffcv_loader, ffcv_loader.indices, self.config.seed
            self.distributed, self.sampler = False, None
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return _epoch_rows(self.config, self.n, epoch)[self.start_batch * self.config.batch_size:]

    return EpochRows


class _Stream:
    """FFCV reading the ``.beton`` batch by batch (raw image and label as stored) to the device."""

    def __init__(self, path: str, size: tuple, field_names: tuple, config: SegmentationConfig):
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor

        self.size = size
        to_device = [ToTensor()] + ([ToDevice(config.device, non_blocking=True)]
                                   if config.device.type != "cpu" else [])
        decoders = {"image": SimpleRGBImageDecoder(), "label": NDArrayDecoder(), "index": IntDecoder()}
        pipelines = {name: ([decoders[name]] + to_device if name in decoders else None) for name in field_names}
        self._order = _order_class()(config, size[0])
        self._loader = Loader(path, batch_size=config.batch_size, num_workers=config.num_workers,
                              os_cache=config.os_cache, order=self._order, distributed=False, seed=config.seed,
                              pipelines=pipelines, drop_last=config.drop_last, batches_ahead=config.batches_ahead)
        self._names = list(self._loader.pipeline_specs)

    def batches(self, config: SegmentationConfig, epoch: int, start: int, count: int) -> Iterator[tuple]:
        self._order.start_batch = start
        self._loader.next_epoch = epoch  # FFCV asks the order for this epoch
        it = iter(self._loader)
        try:
            for batch in it:
                got = dict(zip(self._names, batch))
                # the index is copied (FFCV reuses its buffers); image and label are copied by the
                # transform or the normalisation before the next batch is asked for
                yield got["image"], got["label"], got["index"][:, 0].clone()
        finally:
            it.close()  # stops FFCV's worker thread if the consumer leaves early


# ---------------------------------------------------------------------------------- the loader


class SegmentationLoader(KDLoader):
    """A :class:`~kdengine.data.KDLoader` for segmentation (see the module docstring); build it with
    :func:`make_segmentation_loader`.

    Attributes:
        config: the :class:`SegmentationConfig`.
        dataset_size: samples in the whole set.
        image_size: ``(H, W)`` of the stored images.
        resident: True when the set is held on the device (else FFCV streams it, or host arrays
            are moved per batch).
    """

    def __init__(self, source, config: SegmentationConfig, *, resident: bool):
        self.config, self._source, self.resident = config, source, resident
        n, h, w = source.size
        self.dataset_size = n
        self.image_size = (h, w)
        self._shard_size = len(shard(np.arange(n), config.rank, config.world_size, config.drop_last))
        self._normalize = Normalizer(config)
        self._init_epochs()

    def resolution(self, epoch: Optional[int] = None) -> int:
        """The height of the images the loader yields: the crop's for ``seg_train``, the stored
        images' for ``seg_val`` (the same every epoch)."""
        return self.image_size[0] if self.config.is_val else self.config.crop_size[0]

    def __iter__(self) -> Iterator[tuple]:
        epoch, start = self._take_epoch()
        c = self.config
        for b, (images, labels, indices) in enumerate(self._source.batches(c, epoch, start, len(self)), start):
            if c.is_val:
                yield self._normalize.nhwc(images), labels.to(torch.int64, copy=True)
                continue
            g = torch.Generator().manual_seed(seed_for(c.seed, AUGMENT_STREAM, epoch, c.rank, c.world_size, b))
            images, labels = seg_train_transform(images, labels, g, crop_size=c.crop_size, scale_range=c.scale_range,
                                                 flip=c.flip, ignore_index=c.ignore_index, fill=c.mean)
            yield self._normalize.nhwc(images), labels, indices


def _as_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.from_numpy(np.ascontiguousarray(x))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__} ({exc})") from None


def _arrays(source) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked ``(images uint8 [N, H, W, 3], labels uint8 [N, H, W])`` of an array source."""
    images, labels = (_as_tensor("source[0] (images)", source[0]), _as_tensor("source[1] (labels)", source[1]))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[0] == 0:
        raise ValueError(f"source[0] (images) must be uint8 [N, H, W, 3] with N >= 1, got {images.dtype} "
                         f"{tuple(images.shape)}")
    n, h, w = images.shape[:3]
    if labels.shape != (n, h, w) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"source[1] (labels) must be integers [N, H, W] = [{n}, {h}, {w}] like the images, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if labels.dtype != torch.uint8:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"source[1] (labels) must lie in [0, 255] (held as uint8; 255 = ignore), "
                             f"got values {lo}..{hi}")
        labels = labels.to(torch.uint8)
    return images, labels


def _beton_source(path, config: SegmentationConfig, device_resident) -> tuple:
    """``(source, resident)`` of a ``.beton``: read whole onto the device, or streamed by FFCV."""
    from ffcv.reader import Reader

    info = beton_info(path)
    missing = [f for f in SEG_FIELDS if f not in info.fields]
    if missing:
        raise ValueError(f"source: {str(info.path)!r} has no field {missing[0]!r}; its fields are {list(info.fields)} "
                         f"(write it with kdengine.data.cityscapes.write_cityscapes)")
    if info.num_samples == 0:
        raise ValueError(f"source: {str(info.path)!r} holds no samples")
    if info.image_sizes is None or info.constant_size is None:
        raise ValueError(f"source: {str(info.path)!r} needs one image size (an RGBImageField); it has "
                         f"{info.image_sizes} (heights, widths)")
    h, w = info.constant_size
    handler = Reader(str(info.path)).handlers["label"]
    shape, dtype = tuple(getattr(handler, "shape", ())), getattr(handler, "dtype", None)
    if shape != (h, w) or dtype != np.uint8:
        raise ValueError(f"source: the 'label' field of {str(info.path)!r} is {dtype} {shape}; it must be an "
                         f"NDArrayField uint8 [H, W] = [{h}, {w}] like the images")
    n = info.num_samples
    if device_resident == "auto":
        device_resident = segmentation_resident_bytes(n, h, w) <= resident_budget(config.device)
    if not device_resident:
        return _Stream(str(info.path), (n, h, w), info.fields, config), False
    return _Resident(*_read_beton(str(info.path), (n, h, w), info.fields, config), config.device), True


def _read_beton(path: str, size: tuple, field_names: tuple, config: SegmentationConfig) -> tuple:
    """Every sample of the file (sequential, as stored) in tensors on the device."""
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    n, h, w = size
    dev = config.device
    images = torch.empty((n, h, w, 3), dtype=torch.uint8, device=dev)
    labels = torch.empty((n, h, w), dtype=torch.uint8, device=dev)
    indices = torch.empty(n, dtype=torch.int64, device=dev)
    wanted = {"image": [SimpleRGBImageDecoder()], "label": [NDArrayDecoder()], "index": [IntDecoder()]}
    chunk = max(1, min(n, READ_CHUNK_BYTES // (h * w * 4)))
    loader = Loader(path, batch_size=chunk, num_workers=config.num_workers, os_cache=config.os_cache,
                    order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={name: wanted.get(name) for name in field_names})
    names = list(loader.pipeline_specs)
    done = 0
    for batch in loader:
        got = dict(zip(names, batch))
        k = len(got["index"])
        images[done:done + k].copy_(torch.from_numpy(np.asarray(got["image"])))
        labels[done:done + k].copy_(torch.from_numpy(np.asarray(got["label"])))
        indices[done:done + k].copy_(torch.from_numpy(np.asarray(got["index"])[:, 0]))
        done += k
    return images, labels, indices


def make_segmentation_loader(
    source,
    *,
    pipeline: str,
    batch_size: int,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: Optional[bool] = None,
    crop_size: Union[int, Sequence[int]] = (512, 1024),
    scale_range: Sequence[float] = (0.5, 2.0),
    flip: bool = True,
    ignore_index: int = IGNORE_INDEX,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    seed: int = 0,
    order: Optional[str] = None,
    drop_last: Optional[bool] = None,
    distributed: bool = False,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    num_workers: Optional[int] = None,
    device_resident: Union[bool, str] = "auto",
    os_cache: bool = True,
    batches_ahead: int = 3,
) -> SegmentationLoader:
    """A segmentation loader (see the module docstring for the pipelines and outputs).

    Args:
        source: a ``.beton`` path (fields ``image``, ``label`` uint8 ``[H, W]``, ``index``: see
            :func:`kdengine.data.cityscapes.write_cityscapes`), or a pair ``(images uint8
            [N, H, W, 3], labels [N, H, W])`` of numpy arrays or tensors (labels in 0..255; their
            indices are ``0..N-1``).
        pipeline: ``"seg_train"`` or ``"seg_val"``.
        batch_size: samples per batch.
        device: where the batches are delivered.
        dtype: the images' floating dtype.
        channels_last: images in channels_last memory (None: True on CUDA).
        crop_size: ``seg_train``'s output ``(h, w)`` (an int: square).
        scale_range: ``seg_train``'s random scale range ``(low, high)``.
        flip: ``seg_train``'s random horizontal flips.
        ignore_index: the label of padded pixels, 0..255; the stored labels' ignored pixels keep
            their stored value (255 in files from ``write_cityscapes``), so keep the two equal.
        mean, std: per channel in 0..255 units (default: ImageNet's); the padding colour is ``mean``.
        seed: the seed of the epoch orders and the augmentation draws.
        order: ``"random"`` or ``"sequential"`` (None: sequential for ``seg_val``, random otherwise).
        drop_last: drop the last partial batch (None: True for ``seg_train``).
        distributed: shard each epoch over the ranks of the ``torch.distributed`` group (or the
            explicit ``rank`` / ``world_size``), as the classification loaders do.
        rank, world_size: explicit sharding with ``distributed=True``.
        num_workers: FFCV's threads (default: all cores).
        device_resident: True, False or ``"auto"`` (the set on the device when it fits
            :func:`kdengine.data.resident_budget`); False streams a ``.beton`` through FFCV, and
            keeps arrays on the host.
        os_cache: FFCV reads through the page cache (else its own process cache).
        batches_ahead: FFCV's prefetch depth.

    Returns:
        A :class:`SegmentationLoader`.

    Raises:
        ValueError: a bad option (named), a source of the wrong shape or kind, a ``.beton``
            without the segmentation fields.
        FileNotFoundError: no file at the ``.beton`` path.
    """
    config = SegmentationConfig(
        pipeline=pipeline, batch_size=batch_size, device=device, dtype=dtype, channels_last=channels_last,
        crop_size=crop_size, scale_range=scale_range, flip=flip, ignore_index=ignore_index, mean=mean, std=std,
        seed=seed, order=order, drop_last=drop_last, distributed=distributed, rank=rank, world_size=world_size,
        num_workers=num_workers, os_cache=os_cache, batches_ahead=batches_ahead)
    if not (device_resident is True or device_resident is False or device_resident == "auto"):
        raise ValueError(f"device_resident must be True, False or 'auto', got {device_resident!r}")
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise ValueError(f"source must be a .beton path or a pair (images, labels), got a sequence of "
                             f"{len(source)} items")
        images, labels = _arrays(source)
        n, h, w = images.shape[:3]
        if device_resident == "auto":
            device_resident = segmentation_resident_bytes(n, h, w) <= resident_budget(config.device)
        store = config.device if device_resident else torch.device("cpu")
        return SegmentationLoader(_Resident(images, labels, torch.arange(n), store), config,
                                  resident=bool(device_resident))
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a .beton path or a pair (images, labels), got {type(source).__name__}")
    resident_source, resident = _beton_source(source, config, device_resident)
    return SegmentationLoader(resident_source, config, resident=resident)
