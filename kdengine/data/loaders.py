"""Loaders of ``.beton`` files for training and evaluation: :func:`make_loader` builds either the
FFCV-backed :class:`FFCVLoader` or the device-resident :class:`~.device_loader.DeviceLoader`;
both are :class:`KDLoader` s with the same interface.

Pipelines (``pipeline=``):

* ``imagenet_train``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) decoded straight to
  ``resolution`` pixels (an int, or ``callable(epoch) -> int`` for a per-epoch schedule), random
  horizontal flip. The device loader resamples bilinearly, bicubically or either per image
  (``interpolation``); FFCV with OpenCV's area filter only (it refuses the other two).
* ``imagenet_val``: centre crop of side ``val_crop_pct`` (default ``224/256``) of the short side,
  resized to ``resolution`` (timm's ``Resize(resolution / crop_pct)`` + ``CenterCrop``).
* ``cifar_train``: random translation by up to ``crop_padding`` pixels (pad and crop; the border
  is the ``mean`` colour, ``padding_mode="fill"``, or mirrored, ``"reflect"``: device loader
  only), random horizontal flip; the images keep their stored size (``resolution`` is unused), or
  are resized to ``resize`` (device loader only).
* ``cifar_val``: the images as stored (or resized to ``resize``).

Then, on ``device`` (``ToDevice(non_blocking=True)`` on CUDA): NCHW, channels_last memory when
asked, ``(x - mean) / std`` in ``dtype``. Training pipelines may add, in timm's order after the
crop and flip, ``randaugment`` (timm's RandAugment, on the uint8 values, before normalisation)
and ``random_erasing`` (timm's RandomErasing, after it), in both loaders by one code path
(:class:`~.augment.BatchAugment`), drawn from a generator seeded per ``(seed, epoch, rank,
world_size, batch index)`` (:func:`~._loading.batch_generator`): reproducible, and a resumed
epoch draws as an uninterrupted one.

``device_resident="auto"`` picks the device loader for ``cifar_*`` pipelines when the decoded set
fits :func:`resident_budget`: 2 GiB on the CPU, a quarter of the free memory of a CUDA device
(:func:`resident_bytes`: 4 bytes a pixel, 1 more with masks, 16 a sample). It holds the set as
uint8 and runs crop and flip batched on the device (far faster than FFCV's
per-image CPU work on 32-pixel images); ``imagenet_*`` pipelines stay with FFCV under "auto",
except ``imagenet_train`` with an ``interpolation`` FFCV lacks (bicubic or random) on a set of
one image size that fits (e.g. CIFAR upscaled to 224 px as the PAT/OFA recipes train).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ._loading import (
    FIELDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LOADER_PIPELINES,
    ORDERS,
    RRC_RATIO,
    RRC_SCALE,
    BetonInfo,
    KDLoader,
    LoaderConfig,
    Normalizer,
    Resolution,
    batch_generator,
    beton_info,
    center_crop_box,
    check_fields,
    epoch_batches,
    epoch_order,
    resize_masks,
    shard,
)
from .augment import BatchAugment

__all__ = ["FIELDS", "IMAGENET_MEAN", "IMAGENET_STD", "LOADER_PIPELINES", "ORDERS", "FFCVLoader", "KDLoader",
           "auto_resident", "make_loader", "resident_budget", "resident_bytes"]

GiB = 1 << 30
CPU_RESIDENT_BUDGET = 2 * GiB
CUDA_RESIDENT_FRACTION = 0.25


def make_loader(
    path: Union[str, os.PathLike],
    *,
    pipeline: str,
    batch_size: int,
    num_workers: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: Optional[bool] = None,
    order: Optional[str] = None,
    drop_last: Optional[bool] = None,
    distributed: bool = False,
    seed: int = 0,
    os_cache: bool = True,
    fields: Sequence[str] = ("image", "label"),
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    resolution: Resolution = 224,
    device_resident: Union[bool, str] = "auto",
    crop_padding: int = 4,
    padding_mode: str = "fill",
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    batches_ahead: int = 3,
    resize: Optional[int] = None,
    randaugment: Optional[str] = None,
    random_erasing: float = 0.0,
    val_crop_pct: Optional[float] = None,
    interpolation: str = "bilinear",
) -> KDLoader:
    """A loader of the ``.beton`` at ``path`` (see the module docstring for the pipelines).

    Args:
        path: the ``.beton`` file.
        pipeline: one of :data:`LOADER_PIPELINES`.
        batch_size: samples per batch.
        num_workers: FFCV's threads (default: all cores).
        device: where the batches are delivered.
        dtype: the images' floating dtype.
        channels_last: images in channels_last memory (None: True on CUDA).
        order: ``"random"`` (a permutation per epoch from ``seed``), ``"quasi_random"`` (FFCV's
            page-local shuffle, for sets larger than the page cache, mostly with
            ``os_cache=False``; distributed too: every rank computes the same order and takes its
            shard; the device loader treats it as random) or ``"sequential"`` (None: sequential
            for ``*_val``, random otherwise).
        drop_last: drop the last partial batch (None: True for train pipelines).
        distributed: shard each epoch over the ranks of the ``torch.distributed`` group (or the
            explicit ``rank`` / ``world_size``): disjoint shards covering the epoch (see
            :func:`kdengine.data.epoch_order` and ``shard``).
        seed: the seed of the epoch orders (and of the device loader's crops and flips).
        os_cache: FFCV reads through the page cache (else its own process cache).
        fields: any of ``"image"``, ``"label"``, ``"mask"``, ``"index"``, yielded in the order given.
        mean, std: per channel in 0..255 units (default: ImageNet's).
        resolution: the output side of ``imagenet_*`` batches, or ``callable(epoch) -> int``.
        device_resident: True, False or ``"auto"`` (the rule in the module docstring).
        crop_padding: ``cifar_train``'s translation range in pixels.
        padding_mode: ``"fill"`` (the mean colour) or ``"reflect"`` (device loader only).
        rank, world_size: explicit sharding with ``distributed=True``.
        batches_ahead: FFCV's prefetch depth.
        resize: ``cifar_*``: resize the crops to ``resize x resize`` (bilinear; device loader only).
        randaugment: ``*_train``: timm's RandAugment string, e.g. ``"rand-m9-mstd0.5-inc1"``, on
            the crops' uint8 values before normalisation (both loaders; seeded per batch).
        random_erasing: ``*_train``: timm's RandomErasing probability, pixel mode, after
            normalisation (both loaders; seeded per batch).
        val_crop_pct: ``imagenet_val``: the centre crop's side over the image's short side, in
            (0, 1] (timm's ``crop_pct``: 0.875 for ResNets, 0.9 for DeiT/Swin); None: 224/256.
        interpolation: ``imagenet_train``: the RandomResizedCrop's resampling, ``"bilinear"``,
            ``"bicubic"`` or ``"random"`` (one of the two per image, as timm's
            RandomResizedCropAndInterpolation); the FFCV loader resamples with OpenCV's area filter
            under ``"bilinear"`` and refuses the other two (device loader only).

    Returns:
        A :class:`KDLoader`: an :class:`FFCVLoader` or a :class:`~kdengine.data.DeviceLoader`.

    Raises:
        ValueError: a bad option (the message names it), or one the chosen loader lacks.
    """
    config = LoaderConfig(
        pipeline=pipeline, batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype,
        channels_last=channels_last, order=order, drop_last=drop_last, distributed=distributed, seed=seed,
        os_cache=os_cache, fields=fields, mean=mean, std=std, resolution=resolution,
        crop_padding=crop_padding, padding_mode=padding_mode, rank=rank, world_size=world_size,
        batches_ahead=batches_ahead, resize=resize, randaugment=randaugment, random_erasing=random_erasing,
        val_crop_pct=val_crop_pct, interpolation=interpolation)
    if device_resident not in (True, False, "auto"):
        raise ValueError(f"device_resident must be True, False or 'auto', got {device_resident!r}")
    info = beton_info(path)
    check_fields(info, config)
    if device_resident == "auto":
        device_resident = auto_resident(info, config)
    if device_resident:
        from .device_loader import DeviceLoader

        return DeviceLoader.from_beton(info, config)
    return FFCVLoader(info, config)


def auto_resident(info: BetonInfo, config: LoaderConfig) -> bool:
    """The "auto" rule: ``cifar_*`` pipelines, and ``imagenet_train`` with an ``interpolation``
    only the device loader has, whose images have one size and whose decoded set fits
    :func:`resident_budget`."""
    wanted = not config.is_imagenet or config.interpolation != "bilinear"
    return (wanted and info.constant_size is not None
            and resident_bytes(info, config.fields) <= resident_budget(config.device))


def resident_bytes(info: BetonInfo, fields: Sequence[str] = ("image", "label")) -> int:
    """Bytes the device loader holds for this file: images (4 bytes a pixel: RGB and a spare byte,
    for fast gathers), masks if asked (1 byte a pixel), labels and indices (8 bytes each)."""
    h, w = info.constant_size or (0, 0)
    n = info.num_samples
    return n * h * w * (4 + ("mask" in fields)) + 16 * n


def resident_budget(device: Union[str, torch.device]) -> int:
    """The most bytes ``device_resident="auto"`` puts on a device.

    Args:
        device: the loader's device.

    Returns:
        2 GiB for the CPU, or a quarter of the free memory of a CUDA device (it must leave room
        for the model and its activations).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_RESIDENT_FRACTION)
    return CPU_RESIDENT_BUDGET


# ---------------------------------------------------------------------------------- FFCV


def _make_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class EpochOrder(TraversalOrder):
        """The epoch order FFCV's Loader follows: ours (one seed rule for both loaders, shards
        without padding, a resumable start), handed to the Loader as an instance it calls with
        itself."""

        def __init__(self, config: LoaderConfig, dataset_size: int):
            self.config, self.n = config, dataset_size
            self.start_batch = 0
            self._pages = None

        def __call__(self, ffcv_loader):  # Loader does `order(self)` for TraversalOrder instances
            self.loader = ffcv_loader
            self.indices, self.seed, self.distributed = ffcv_loader.indices, self.config.seed, False
            self.sampler = None
            if self.config.order == "quasi_random":
                self._pages = _page_table(ffcv_loader.memory_manager.page_to_samples)
            return self

        def global_order(self, epoch: int) -> np.ndarray:
            if self.config.order != "quasi_random":
                return epoch_order(self.n, self.config.order, self.config.seed, epoch)
            from ffcv.traversal_order.quasi_random import generate_order_inner

            table, sizes = self._pages
            out = np.zeros(self.n, dtype=np.int64)
            # on a copy: the routine shuffles the table in place, which would make each epoch's
            # order depend on the epochs drawn before it (and break resuming)
            generate_order_inner(self.config.seed * 912300 + epoch, table.copy(), sizes, out,
                                 2 * self.config.batch_size)
            return out

        def sample_order(self, epoch: int) -> np.ndarray:
            c = self.config
            mine = epoch_batches(shard(self.global_order(epoch), c.rank, c.world_size, c.drop_last),
                                 c.batch_size, c.drop_last)
            return mine[self.start_batch * c.batch_size:]

    return EpochOrder


def _page_table(page_to_samples) -> tuple[np.ndarray, np.ndarray]:
    """FFCV's page -> samples map as the padded arrays its quasi-random routine reads."""
    if not page_to_samples:
        raise ValueError("order='quasi_random' needs a file whose samples live in data pages; use 'random'")
    pages = int(max(page_to_samples)) + 1
    width = max(len(s) for s in page_to_samples.values())
    table = np.zeros((pages, width), dtype=np.int64)
    sizes = np.zeros(pages, dtype=np.int64)
    for page, samples in page_to_samples.items():
        members = sorted(int(s) for s in samples)
        table[int(page), :len(members)] = members
        sizes[int(page)] = len(members)
    return table, sizes


class FFCVLoader(KDLoader):
    """FFCV's Loader with our pipelines, epoch order and output conventions (see
    :func:`make_loader`). The crops and flips run in FFCV's threads on the CPU and are not seeded
    (FFCV draws from numba's global generator); the order is, and so are ``randaugment`` and
    ``random_erasing``, applied to each decoded batch on the device (per-batch generator)."""

    def __init__(self, info: BetonInfo, config: LoaderConfig):
        from ffcv.loader import Loader

        if "mask" in config.fields and not config.is_val:
            raise ValueError(
                f"fields: 'mask' with pipeline {config.pipeline!r} is not supported by the FFCV loader "
                "(its random crops and flips cannot be applied to the masks alike); use the device-resident "
                "loader: make_loader(..., device_resident=True)")
        if config.resize:
            raise ValueError(f"resize={config.resize}: only the device-resident loader has it (device_resident=True)")
        if config.interpolation != "bilinear":
            raise ValueError(f"interpolation={config.interpolation!r}: only the device-resident loader has it "
                             "(device_resident=True); FFCV's RandomResizedCrop resamples with OpenCV's area filter")
        if config.padding_mode != "fill":
            raise ValueError(f"padding_mode={config.padding_mode!r} is only available on the device-resident "
                             "loader (device_resident=True); FFCV translates with a fill colour ('fill')")
        self.config, self.info = config, info
        self.dataset_size = info.num_samples
        self._image_size = info.constant_size
        self._shard_size = len(shard(np.arange(self.dataset_size), config.rank, config.world_size,
                                     config.drop_last))
        self._normalize = Normalizer(config)
        self._augment = BatchAugment(config, self._normalize) if config.augments else None
        if config.pipeline == "imagenet_val" and info.image_sizes is not None:  # fail here, not in FFCV's threads
            (h0, _), (w0, _) = info.image_sizes
            center_crop_box(h0, w0, config.crop_ratio)
        self._res = config.resolution_at(0) if config.is_imagenet else None
        self._order = _make_order_class()(config, self.dataset_size)
        pipelines = {name: None for name in info.fields}  # FFCV decodes every field not disabled
        pipelines.update({name: self._pipeline(name) for name in config.fields})
        self._loader = Loader(str(info.path), batch_size=config.batch_size, num_workers=config.num_workers,
                              os_cache=config.os_cache, order=self._order, distributed=False,
                              seed=config.seed, pipelines=pipelines, drop_last=config.drop_last,
                              batches_ahead=config.batches_ahead)
        self._names = list(self._loader.pipeline_specs)  # the order FFCV yields the fields in
        self._init_epochs()

    def _to_device(self) -> list:
        from ffcv.transforms import ToDevice, ToTensor

        ops = [ToTensor()]
        if self.config.device.type != "cpu":  # on the CPU the tensor already is where it goes
            ops.append(ToDevice(self.config.device, non_blocking=True))
        return ops

    def _pipeline(self, name: str) -> list:
        from ffcv.fields.decoders import (
            CenterCropRGBImageDecoder,
            IntDecoder,
            NDArrayDecoder,
            RandomResizedCropRGBImageDecoder,
            SimpleRGBImageDecoder,
        )
        from ffcv.transforms import RandomHorizontalFlip, RandomTranslate

        c = self.config
        if name in ("label", "index"):
            return [IntDecoder()] + self._to_device()
        if name == "mask":
            return [NDArrayDecoder()] + self._to_device()
        if c.pipeline == "imagenet_train":
            self._decoder = RandomResizedCropRGBImageDecoder((self._res, self._res), scale=RRC_SCALE,
                                                             ratio=RRC_RATIO)
            ops = [self._decoder, RandomHorizontalFlip()]
        elif c.pipeline == "imagenet_val":
            ops = [CenterCropRGBImageDecoder((self._res, self._res), ratio=c.crop_ratio)]
        elif c.pipeline == "cifar_train":
            fill = tuple(int(round(m)) for m in c.mean)  # the border normalises to about 0
            ops = [SimpleRGBImageDecoder(), RandomHorizontalFlip()]
            if c.crop_padding:
                ops.append(RandomTranslate(padding=c.crop_padding, fill=fill))
        else:
            ops = [SimpleRGBImageDecoder()]
        return ops + self._to_device()

    def _set_resolution(self, res: int) -> None:
        if res != self._res:
            # the new size changes the buffers every later op allocates: regenerate the pipeline code
            self._decoder.output_size = (res, res)
            self._loader.generate_code()
            self._res = res

    def __iter__(self) -> Iterator[tuple]:
        epoch, start = self._take_epoch()
        if self.config.pipeline == "imagenet_train":
            self._set_resolution(self.config.resolution_at(epoch))
        self._order.start_batch = start
        self._loader.next_epoch = epoch  # FFCV asks the order for this epoch
        it = iter(self._loader)
        try:
            for b, batch in enumerate(it, start):
                g = batch_generator(self.config, epoch, b) if self._augment is not None else None
                yield self._outputs(dict(zip(self._names, batch)), g)
        finally:
            it.close()  # stops FFCV's worker thread if the consumer leaves early

    def _outputs(self, got: dict, g) -> tuple:
        out = []
        for name in self.config.fields:
            x = got[name]
            if name == "image":
                out.append(self._normalize.nhwc(x) if g is None else self._augment.nhwc(x, g))
            elif name == "mask":
                if self.config.pipeline == "imagenet_val":
                    out.append(resize_masks(x, *center_crop_box(*x.shape[1:], self.config.crop_ratio), self._res))
                else:
                    out.append(x.clone())  # FFCV reuses its buffers
            else:
                out.append(x[:, 0].clone())
        return tuple(out)
