"""What the FFCV-backed loader (:mod:`.loaders`) and the device-resident loader
(:mod:`.device_loader`) share: the options and their checks, the epoch order and its sharding
across ranks, the seeds of the per-batch random draws (:func:`batch_generator`), normalisation on
the device, the validation crop box and a look at a ``.beton``'s header.

Order and sharding are the same function for both loaders, so a seed gives the same epoch order
whichever loader ``make_loader`` picks (except ``quasi_random``, which only exists for FFCV).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

#: The loader pipelines (``make_loader(pipeline=...)``).
LOADER_PIPELINES = ("imagenet_train", "imagenet_val", "cifar_train", "cifar_val")
ORDERS = ("random", "quasi_random", "sequential")
FIELDS = ("image", "label", "mask", "index")
PADDING_MODES = ("fill", "reflect")
#: ImageNet statistics in 0..255 units, the default ``mean`` / ``std``.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
#: Validation centre crop: the crop's side over the image's short side (resize 256, crop 224);
#: ``val_crop_pct=None`` means this.
VAL_CROP_RATIO = 224 / 256
#: ``imagenet_train``'s resampling of its RandomResizedCrop (``interpolation=``): "random" picks
#: one of the other two per image, as timm's RandomResizedCropAndInterpolation(interpolation="random").
INTERPOLATIONS = ("bilinear", "bicubic", "random")
#: RandomResizedCrop's area and aspect-ratio ranges (torchvision's and FFCV's defaults).
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)

Resolution = Union[int, Callable[[int], int]]
#: ``imagenet_*`` pipelines' output side when ``resolution`` is None.
DEFAULT_RESOLUTION = 224


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass
class LoaderConfig:
    """The checked options of :func:`kdengine.data.make_loader` (see there)."""

    pipeline: str
    batch_size: int
    num_workers: Optional[int] = None
    device: Union[str, torch.device] = "cpu"
    dtype: torch.dtype = torch.float32
    channels_last: Optional[bool] = None
    order: Optional[str] = None
    drop_last: Optional[bool] = None
    distributed: bool = False
    seed: int = 0
    os_cache: bool = True
    fields: Sequence[str] = ("image", "label")
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    resolution: Optional[Resolution] = DEFAULT_RESOLUTION
    crop_padding: int = 4
    padding_mode: str = "fill"
    rank: Optional[int] = None
    world_size: Optional[int] = None
    batches_ahead: int = 3
    resize: Optional[int] = None  # cifar_*: resize to resize x resize after the crop and flip (device loader only)
    randaugment: Optional[str] = None  # *_train: timm's RandAugment, e.g. "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.0  # *_train: timm's RandomErasing probability (pixel mode)
    val_crop_pct: Optional[float] = None  # imagenet_val: crop side / short side (timm's crop_pct; None: 0.875)
    interpolation: str = "bilinear"  # imagenet_train: the crop's resampling (bicubic/random: device loader only)

    def __post_init__(self):
        if self.pipeline not in LOADER_PIPELINES:
            raise ValueError(f"pipeline must be one of {LOADER_PIPELINES}, got {self.pipeline!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.num_workers is None:
            self.num_workers = os.cpu_count() or 1
        if not _is_int(self.num_workers) or self.num_workers < 1:
            raise ValueError(f"num_workers must be a positive int or None, got {self.num_workers!r}")
        try:
            self.device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: not a torch device: {self.device!r} ({exc})") from None
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")
        if self.channels_last is None:
            self.channels_last = self.device.type == "cuda"
        if self.order is None:
            self.order = "sequential" if self.is_val else "random"
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.drop_last is None:
            self.drop_last = not self.is_val
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if isinstance(self.fields, str):
            raise ValueError(f"fields must be a sequence of field names, got the string {self.fields!r}")
        self.fields = tuple(self.fields)
        unknown = [f for f in self.fields if f not in FIELDS]
        if unknown or not self.fields or len(set(self.fields)) != len(self.fields):
            raise ValueError(f"fields must be distinct names among {FIELDS}, got {self.fields!r}")
        self.mean = _per_channel("mean", IMAGENET_MEAN if self.mean is None else self.mean)
        self.std = _per_channel("std", IMAGENET_STD if self.std is None else self.std)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resolution is None:  # an unset setting passed on (the engine's data.resolution)
            self.resolution = DEFAULT_RESOLUTION
        if callable(self.resolution):
            if self.pipeline != "imagenet_train":
                raise ValueError(f"resolution: a per-epoch schedule (callable) is only for "
                                 f"'imagenet_train', not {self.pipeline!r}; pass an int")
        else:
            _check_resolution(self.resolution, "resolution")
        if not _is_int(self.crop_padding) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative int, got {self.crop_padding!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if not _is_int(self.batches_ahead) or self.batches_ahead < 1:
            raise ValueError(f"batches_ahead must be a positive int, got {self.batches_ahead!r}")
        self._check_augmentations()
        self.rank, self.world_size = _rank_and_world(self.distributed, self.rank, self.world_size)

    def _check_augmentations(self) -> None:
        if self.resize is not None:
            _check_resolution(self.resize, "resize")
            if self.is_imagenet:
                raise ValueError(f"resize is for cifar_* pipelines; {self.pipeline!r} resizes to `resolution`")
        if self.randaugment is not None and not isinstance(self.randaugment, str):
            raise ValueError(f"randaugment must be a string such as 'rand-m9-mstd0.5-inc1', got {self.randaugment!r}")
        if not isinstance(self.random_erasing, (int, float)) or not 0 <= self.random_erasing <= 1:
            raise ValueError(f"random_erasing must be a probability in [0, 1], got {self.random_erasing!r}")
        if self.is_val and (self.randaugment is not None or self.random_erasing):
            raise ValueError(f"randaugment and random_erasing are training augmentations, not for {self.pipeline!r}")
        if "mask" in self.fields and self.randaugment is not None:
            raise ValueError("fields: 'mask' with randaugment is not supported (its geometric ops do not move masks)")
        if self.val_crop_pct is not None:
            pct = self.val_crop_pct
            if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 1:
                raise ValueError(f"val_crop_pct must be a number in (0, 1] (e.g. 0.875 or 0.9) or None, got {pct!r}")
            if self.pipeline != "imagenet_val":
                raise ValueError(f"val_crop_pct={pct!r} is for the 'imagenet_val' pipeline, not {self.pipeline!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.interpolation != "bilinear" and self.pipeline != "imagenet_train":
            raise ValueError(f"interpolation={self.interpolation!r} is for the 'imagenet_train' pipeline (its "
                             f"RandomResizedCrop), not {self.pipeline!r}")

    @property
    def is_val(self) -> bool:
        return self.pipeline.endswith("_val")

    @property
    def is_imagenet(self) -> bool:
        return self.pipeline.startswith("imagenet")

    @property
    def crop_ratio(self) -> float:
        """``imagenet_val``'s crop side over the short side: ``val_crop_pct``, or :data:`VAL_CROP_RATIO`."""
        return VAL_CROP_RATIO if self.val_crop_pct is None else float(self.val_crop_pct)

    @property
    def augments(self) -> bool:
        """Whether training batches get RandAugment or random erasing after the crop and flip."""
        return self.randaugment is not None or bool(self.random_erasing)

    def resolution_at(self, epoch: int) -> int:
        """The output side of ``imagenet_*`` batches in ``epoch``."""
        if not callable(self.resolution):
            return int(self.resolution)
        return _check_resolution(self.resolution(epoch), f"resolution({epoch})")


def _per_channel(name: str, values) -> tuple:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (0..255 units), got {values!r}") from None
    if len(out) != 3:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {len(out)}: {values!r}")
    return out


def _check_resolution(value, what: str) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _rank_and_world(distributed: bool, rank, world_size) -> tuple[int, int]:
    if not distributed:
        if rank is not None or world_size is not None:
            raise ValueError(f"rank={rank!r} / world_size={world_size!r} need distributed=True")
        return 0, 1
    if rank is None and world_size is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group "
                               "(or explicit rank= and world_size=)")
        return dist.get_rank(), dist.get_world_size()
    if not (_is_int(rank) and _is_int(world_size) and 0 <= rank < world_size):
        raise ValueError(f"rank and world_size must be ints with 0 <= rank < world_size, "
                         f"got rank={rank!r}, world_size={world_size!r}")
    return int(rank), int(world_size)


# ---------------------------------------------------------------------------------- order


def seed_for(seed: int, *words: int) -> int:
    """A 63-bit seed mixed from a seed and further words (through ``np.random.SeedSequence``, so
    nearby inputs give unrelated streams).

    Args:
        seed: the run's seed.
        *words: what the stream is for (a stream tag such as :data:`AUGMENT_STREAM`, an epoch, a
            batch index, ...).

    Returns:
        A non-negative int below ``2**63``.
    """
    state = np.random.SeedSequence(seed, spawn_key=tuple(int(w) for w in words)).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


#: Stream tags of :func:`seed_for`: the epoch order and the per-batch draws never share a seed.
PERMUTATION_STREAM, AUGMENT_STREAM = 1, 2


def batch_generator(config: LoaderConfig, epoch: int, batch: int) -> torch.Generator:
    """The CPU generator of one batch's random draws, a function of ``(seed, epoch, rank,
    world_size, batch index)`` alone: both loaders seed their per-batch augmentations from it, so
    a run resumed at ``(epoch, batch)`` draws what an uninterrupted one draws.

    Args:
        config: the loader's options (its ``seed``, ``rank`` and ``world_size``).
        epoch: the epoch.
        batch: the batch's index in the epoch on this rank (counted from the epoch's start, also
            when a resumed epoch skips its first batches).

    Returns:
        A freshly seeded ``torch.Generator`` on the CPU.
    """
    return torch.Generator().manual_seed(seed_for(config.seed, AUGMENT_STREAM, epoch, config.rank,
                                                  config.world_size, batch))


def epoch_order(n: int, order: str, seed: int, epoch: int) -> np.ndarray:
    """The global order of a set's samples in one epoch, the same for both loaders.

    Args:
        n: samples in the set.
        order: ``"sequential"``, or ``"random"`` / ``"quasi_random"`` (both a permutation here;
            the FFCV loader has its own ``quasi_random``).
        seed: the run's seed.
        epoch: the epoch.

    Returns:
        ``int64 [n]`` sample indices.
    """
    if order == "sequential":
        return np.arange(n, dtype=np.int64)
    g = torch.Generator().manual_seed(seed_for(seed, PERMUTATION_STREAM, epoch))
    return torch.randperm(n, generator=g).numpy()


def shard(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """This rank's samples of an epoch order: every ``world_size``-th from ``rank`` on, so the
    ranks' shards are disjoint and cover the order.

    Args:
        order: the epoch's global order (:func:`epoch_order`).
        rank, world_size: this rank and the number of ranks.
        drop_last: cut the order to a multiple of ``world_size`` first (every rank then has as
            many samples, as training needs); without it nothing is repeated or dropped (unlike
            ``DistributedSampler``'s padding), so a sum all-reduced over ranks counts every
            sample once, and ranks may differ by one sample.

    Returns:
        The rank's sample indices, in order.
    """
    if world_size == 1:
        return order
    if drop_last:
        order = order[: len(order) // world_size * world_size]
    return order[rank::world_size]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches an epoch of ``n`` samples yields (full batches only with ``drop_last``)."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def epoch_batches(shard_order: np.ndarray, batch_size: int, drop_last: bool) -> np.ndarray:
    """The shard cut to what an epoch yields (full batches only with ``drop_last``)."""
    return shard_order[: num_batches(len(shard_order), batch_size, drop_last) * batch_size]


# ---------------------------------------------------------------------------------- the interface


class KDLoader:
    """What the training engine iterates; built by :func:`kdengine.data.make_loader`.

    ``len(loader)`` is the number of batches per epoch on this rank. Iterating yields one tuple per
    batch in ``fields`` order: ``image`` float ``[B, 3, H, W]`` normalised, on ``device`` in
    ``dtype`` (channels_last memory when asked), ``label`` int64 ``[B]``, ``mask`` uint8 ``[B, H, W]``
    in {0, 1} (the same crop and flip as the image), ``index`` int64 ``[B]`` (the samples' indices in
    the file). Every tensor is fresh (never a buffer the loader reuses).

    Call ``set_epoch(epoch, start_batch)`` before iterating an epoch; without it, each iteration
    runs the epoch after the previous one (the first is epoch 0).
    """

    config: LoaderConfig
    dataset_size: int  # samples in the whole set
    _shard_size: int  # samples of the set this rank draws from per epoch

    def _init_epochs(self) -> None:
        self._next = (0, 0)
        if len(self) == 0:
            raise ValueError(f"batch_size={self.batch_size} gives no batches: this rank has "
                             f"{self._shard_size} samples per epoch and drop_last=True")

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (after sharding and ``drop_last``)."""
        n = self._shard_size
        return n // self.batch_size * self.batch_size if self.config.drop_last else n

    def __len__(self) -> int:
        return num_batches(self._shard_size, self.batch_size, self.config.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch the next iteration runs (its order and, for ``imagenet_train``, its
        resolution).

        Args:
            epoch: the epoch, from 0.
            start_batch: batches of it to skip (a resumed run), at most ``len(self)``.
        """
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not _is_int(start_batch) or not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be an int in [0, {len(self)}] (batches per epoch), "
                             f"got {start_batch!r}")
        self.config.resolution_at(epoch)  # a bad schedule fails here, not in a worker thread
        self._next = (int(epoch), int(start_batch))

    def _take_epoch(self) -> tuple[int, int]:
        epoch, start = self._next
        self._next = (epoch + 1, 0)
        return epoch, start

    @property
    def epoch(self) -> int:
        """The epoch the next iteration runs."""
        return self._next[0]

    def resolution(self, epoch: Optional[int] = None) -> int:
        """The side of the images the loader yields.

        Args:
            epoch: for ``imagenet_*`` pipelines, the epoch asked about (default: the next one).

        Returns:
            The ``imagenet_*`` resolution of that epoch, or the stored size for ``cifar_*``.
        """
        if not self.config.is_imagenet:
            return self.config.resize or self._image_size[0]
        return self.config.resolution_at(self.epoch if epoch is None else epoch)

    def __iter__(self) -> Iterator[tuple]:  # pragma: no cover - abstract
        raise NotImplementedError


class Normalizer:
    """uint8 NHWC images -> normalised float NCHW on the device, in the model's dtype:
    ``x * (1/std) - mean/std``. (A permuted NHWC tensor already has channels_last strides.)"""

    def __init__(self, config: LoaderConfig):
        shape = (1, 3, 1, 1)
        self.dtype = config.dtype
        self.format = torch.channels_last if config.channels_last else torch.contiguous_format
        inv_std = [1 / s for s in config.std]
        self.inv_std = torch.tensor(inv_std, dtype=config.dtype, device=config.device).view(shape)
        self.bias = torch.tensor([-m * i for m, i in zip(config.mean, inv_std)], dtype=config.dtype,
                                 device=config.device).view(shape)

    def nhwc(self, images: torch.Tensor) -> torch.Tensor:
        # one pass converts and lays out, one fused multiply-add normalises in place
        x = images.permute(0, 3, 1, 2).to(self.dtype, memory_format=self.format)
        return torch.addcmul(self.bias, x, self.inv_std, out=x)

    def nchw_float(self, images: torch.Tensor) -> torch.Tensor:
        """Already float NCHW in 0..255 (after a resampling crop)."""
        x = images.to(self.dtype, memory_format=self.format, copy=True)
        return torch.addcmul(self.bias, x, self.inv_std, out=x)


def center_crop_box(height: int, width: int, ratio: float = VAL_CROP_RATIO) -> tuple[int, int, int]:
    """``(top, left, side)`` of the validation crop; FFCV's CenterCropRGBImageDecoder's rule.

    Args:
        height, width: the image's size.
        ratio: the crop's side over the short side (``val_crop_pct``).

    Returns:
        ``side = int(ratio * min(height, width))`` and the centred box's corner.

    Raises:
        ValueError: the crop would be empty.
    """
    side = int(ratio * min(height, width))
    if side < 1:
        raise ValueError(f"val_crop_pct={ratio}: the centre crop of a {height}x{width} image is empty "
                         f"(int({ratio} * {min(height, width)}) = 0)")
    return (height - side) // 2, (width - side) // 2, side


def resize_masks(masks: torch.Tensor, top: int, left: int, side: int, out: int) -> torch.Tensor:
    """Centre-crop uint8 masks ``[B, H, W]`` and resize them to ``out`` (nearest: stays binary)."""
    m = masks[:, top:top + side, left:left + side]
    if side == out:
        return m.contiguous()
    m = torch.nn.functional.interpolate(m[:, None].float(), size=(out, out), mode="nearest")
    return m[:, 0].to(torch.uint8)


# ---------------------------------------------------------------------------------- .beton header


@dataclass
class BetonInfo:
    path: Path
    num_samples: int
    fields: tuple  # field names in file order
    image_sizes: tuple  # ((min_h, max_h), (min_w, max_w)) of the "image" field, or None
    mask_shape: Optional[tuple]

    @property
    def constant_size(self) -> Optional[tuple]:
        if self.image_sizes is None:
            return None
        (h0, h1), (w0, w1) = self.image_sizes
        return (h0, w0) if h0 == h1 and w0 == w1 else None


def beton_info(path) -> BetonInfo:
    """Header facts of a ``.beton`` (no sample is decoded); clear errors for a missing or foreign
    file."""
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no .beton file at {str(path)!r}")
    try:
        reader = Reader(str(path))
    except Exception as exc:  # FFCV raises AssertionError / ValueError / numpy errors on bad files
        raise ValueError(f"path: {str(path)!r} is not a readable FFCV .beton ({type(exc).__name__}: {exc})") \
            from None
    names = tuple(reader.field_names)
    sizes = mask_shape = None
    if "image" in names:
        meta = reader.metadata[f"f{names.index('image')}"]
        if "height" in meta.dtype.names:
            h, w = meta["height"], meta["width"]
            sizes = ((int(h.min()), int(h.max())), (int(w.min()), int(w.max()))) if len(h) else ((0, 0), (0, 0))
    if "mask" in names:
        mask_shape = tuple(int(s) for s in getattr(reader.handlers["mask"], "shape", ()))
    return BetonInfo(path, int(reader.num_samples), names, sizes, mask_shape)


def check_fields(info: BetonInfo, config: LoaderConfig) -> None:
    """Each requested field is in the file, and an image field can feed the pipeline."""
    missing = [f for f in config.fields if f not in info.fields]
    if missing:
        hint = (" (files written before the index field existed: rewrite them with kdengine's writers)"
                if "index" in missing else "")
        raise ValueError(f"fields: {str(info.path)!r} has no field {missing[0]!r}; its fields are "
                         f"{list(info.fields)}{hint}")
    if "image" in info.fields and info.image_sizes is None:
        raise ValueError(f"{str(info.path)!r}: its 'image' field is not an RGBImageField")
    if info.num_samples == 0:
        raise ValueError(f"path: {str(info.path)!r} holds no samples")
    if not config.is_imagenet and "image" in info.fields and info.constant_size is None:
        (h0, h1), (w0, w1) = info.image_sizes
        raise ValueError(f"pipeline {config.pipeline!r} needs images of one size; {str(info.path)!r} has "
                         f"heights {h0}..{h1} and widths {w0}..{w1} (use an imagenet_* pipeline)")
    if "mask" in config.fields:
        size = info.constant_size
        if info.mask_shape is None or info.mask_shape != size:
            raise ValueError(f"fields: 'mask' of {str(info.path)!r} has shape {info.mask_shape}; masks must be "
                             f"[H, W] like the images ({size})")
