"""The device-resident loader: a small dataset held whole on the device as uint8 (airbench-style),
cropped, flipped and normalised there in batches. Same interface as the FFCV loader
(:class:`~._loading.KDLoader`); :func:`kdengine.data.make_loader` picks it for ``cifar_*``
pipelines when the set fits (``device_resident="auto"``).

Deterministic: the epoch order is a function of ``(seed, epoch)`` and each batch's crops and flips
of ``(seed, epoch, rank, world_size, batch index)`` alone, drawn from a CPU ``torch.Generator``
seeded from them (so the CPU and CUDA give the same batches too). A run resumed with
``set_epoch(epoch, start_batch)`` therefore sees exactly the batches an uninterrupted one sees.

Pipelines as for FFCV, with two differences: ``imagenet_train``'s RandomResizedCrop resamples
with ``grid_sample`` (bilinear, no antialiasing when it shrinks; ``interpolation="bicubic"``:
bicubic, clamped to 0..255; ``"random"``: one of the two per image, as timm's
RandomResizedCropAndInterpolation) and ``imagenet_val`` resizes its centre crop (``val_crop_pct``
of the short side) with antialiased bilinear interpolation (FFCV uses OpenCV's area resampling);
``cifar_train`` also has ``padding_mode="reflect"``. Masks follow every crop and flip (nearest
sampling: they stay {0, 1}).

Options only this loader has (see :class:`~._loading.LoaderConfig`): ``resize`` (``cifar_*``:
bilinear to ``resize x resize`` after the crop and flip, e.g. CIFAR's 32 px to 224 as the PAT/OFA
recipes train; masks follow, nearest), ``interpolation`` other than bilinear. Then, as in the FFCV
loader (:class:`~.augment.BatchAugment`, timm's order): ``randaugment`` (timm's RandAugment,
:class:`~.augment.RandAugment`), normalisation, ``random_erasing`` (timm's RandomErasing, pixel
mode, :class:`~.augment.RandomErasing`). Their draws, and the per-image interpolation of
``"random"``, come from the batch's generator after the crop and flip draws, so adding them leaves
the crops and flips as they were; the erasing noise comes from a generator on the device seeded
from it (the same batches on the same kind of device).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ._loading import (
    RRC_RATIO,
    RRC_SCALE,
    BetonInfo,
    KDLoader,
    LoaderConfig,
    Normalizer,
    batch_generator,
    center_crop_box,
    epoch_batches,
    epoch_order,
    resize_masks,
    shard,
)
from .augment import BatchAugment

__all__ = ["DeviceLoader"]


class DeviceLoader(KDLoader):
    """Build with :meth:`from_arrays` or ``make_loader(path, ..., device_resident=True)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, masks: Optional[torch.Tensor],
                 indices: torch.Tensor, config: LoaderConfig):
        dev = config.device
        self.config = config
        n, h, w = images.shape[:3]
        # Pixels in one flat table, RGB plus a spare byte packed as int32 (a 1-D int32 gather is
        # several times faster than gathering 3-byte rows), with one extra entry after the set: the
        # fill colour (0 for masks), which a translation's out-of-image pixels point at, so a whole
        # batch's crop and flip is one index_select.
        rgba = torch.zeros((n * h * w + 1, 4), dtype=torch.uint8, device=dev)
        rgba[:-1, :3].copy_(images.reshape(-1, 3))
        rgba[-1, :3] = torch.tensor([round(m) for m in config.mean], dtype=torch.uint8)
        self._pixels = rgba.view(torch.int32).view(-1)
        self.images = rgba[:-1, :3].view(n, h, w, 3)  # uint8 [N, H, W, 3] (a view)
        self.masks = self._mask_pixels = None
        if masks is not None:
            self._mask_pixels = torch.zeros(n * h * w + 1, dtype=torch.uint8, device=dev)
            self._mask_pixels[:-1].copy_(masks.reshape(-1))
            self.masks = self._mask_pixels[:-1].view(n, h, w)
        self.labels = labels.to(dev, torch.int64)
        self.indices = indices.to(dev, torch.int64)
        self.dataset_size = n
        self._image_size = (h, w)
        if config.pipeline == "cifar_train" and config.padding_mode == "reflect" and config.crop_padding >= min(h, w):
            raise ValueError(f"crop_padding={config.crop_padding} must be smaller than the images "
                             f"({h}x{w}) for padding_mode='reflect'")
        self._shard_size = len(shard(np.arange(self.dataset_size), config.rank, config.world_size,
                                     config.drop_last))
        self._normalize = Normalizer(config)
        self._augment = BatchAugment(config, self._normalize)
        # checked here: an empty crop fails at construction, not in the first batch
        self._val_box = center_crop_box(h, w, config.crop_ratio) if config.pipeline == "imagenet_val" else None
        self._init_epochs()

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_arrays(cls, images, labels, masks=None, indices=None, *, pipeline: str = "cifar_train",
                    batch_size: int, **options) -> "DeviceLoader":
        """A loader over in-memory arrays (numpy or torch): ``images`` uint8 ``[N, H, W, 3]``,
        ``labels`` integers ``[N]``, ``masks`` uint8/bool ``[N, H, W]`` (needed for the "mask"
        field), ``indices`` integers ``[N]`` (default ``0..N-1``). ``options``: those of
        :func:`kdengine.data.make_loader` (``num_workers`` and ``os_cache`` are unused)."""
        options.pop("device_resident", None)
        config = LoaderConfig(pipeline=pipeline, batch_size=batch_size, **options)
        images = _tensor("images", images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[0] == 0:
            raise ValueError(f"images must be uint8 [N, H, W, 3] with N >= 1, got {images.dtype} "
                             f"{tuple(images.shape)}")
        n, h, w = images.shape[:3]
        labels = _tensor("labels", labels)
        if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers [N={n}], got {labels.dtype} {tuple(labels.shape)}")
        if masks is not None:
            masks = _tensor("masks", masks)
            if masks.shape != (n, h, w) or masks.dtype not in (torch.uint8, torch.bool):
                raise ValueError(f"masks must be uint8 or bool [N, H, W] = [{n}, {h}, {w}] like the images, "
                                 f"got {masks.dtype} {tuple(masks.shape)}")
        elif "mask" in config.fields:
            raise ValueError("fields: 'mask' is asked for but masks=None")
        if indices is None:
            indices = torch.arange(n)
        indices = _tensor("indices", indices)
        if indices.shape != (n,) or indices.dtype.is_floating_point:
            raise ValueError(f"indices must be integers [N={n}], got {indices.dtype} {tuple(indices.shape)}")
        return cls(images, labels, masks, indices, config)

    @classmethod
    def from_beton(cls, info: BetonInfo, config: LoaderConfig) -> "DeviceLoader":
        """Read every sample once through FFCV (sequential, raw bytes), then move it to the device."""
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption

        if info.constant_size is None:
            (h0, h1), (w0, w1) = info.image_sizes
            raise ValueError(f"device_resident=True needs images of one size; {str(info.path)!r} has heights "
                             f"{h0}..{h1} and widths {w0}..{w1}")
        wanted = {"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]}
        if "mask" in config.fields:
            wanted["mask"] = [NDArrayDecoder()]
        if "index" in config.fields:
            wanted["index"] = [IntDecoder()]
        pipelines = {name: wanted.get(name) for name in info.fields}
        loader = Loader(str(info.path), batch_size=min(1024, info.num_samples), num_workers=config.num_workers,
                        os_cache=config.os_cache, order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines=pipelines)
        names = list(loader.pipeline_specs)
        parts = {name: [] for name in names}
        for batch in loader:
            for name, x in zip(names, batch):
                parts[name].append(np.array(x))  # a copy: FFCV reuses its buffers
        got = {name: torch.from_numpy(np.concatenate(p)) for name, p in parts.items()}
        indices = got["index"][:, 0] if "index" in got else torch.arange(info.num_samples)
        return cls(got["image"], got["label"][:, 0], got.get("mask"), indices, config)

    # ------------------------------------------------------------------ iteration

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """Positions (rows of the arrays) of this rank's samples in ``epoch``, in batch order."""
        c = self.config
        mine = epoch_batches(shard(epoch_order(self.dataset_size, c.order, c.seed, epoch), c.rank,
                                   c.world_size, c.drop_last), c.batch_size, c.drop_last)
        return torch.from_numpy(np.ascontiguousarray(mine)).to(c.device)

    def __iter__(self) -> Iterator[tuple]:
        epoch, start = self._take_epoch()
        c = self.config
        rows = self.epoch_indices(epoch)
        res = c.resolution_at(epoch) if c.is_imagenet else None
        for b in range(start, len(self)):
            sel = rows[b * c.batch_size:(b + 1) * c.batch_size]
            yield self._batch(sel, batch_generator(c, epoch, b), res)

    def _batch(self, sel: torch.Tensor, g: torch.Generator, res: Optional[int]) -> tuple:
        c = self.config
        want_img, want_mask = "image" in c.fields, "mask" in c.fields
        images = masks = None
        if c.pipeline == "cifar_val":
            hw = self._image_size[0] * self._image_size[1]
            itype = torch.int32 if len(self._pixels) < 2**31 else torch.int64
            at = ((sel * hw)[:, None].to(itype) + torch.arange(hw, dtype=itype, device=sel.device)).view(-1)
            images, masks = self._gather(at, len(sel), want_img, want_mask)
        elif c.pipeline == "cifar_train":
            images, masks = self._translate_flip(sel, g, want_img, want_mask)
        elif c.pipeline == "imagenet_train":
            images, masks = self._random_resized_crop(sel, g, res, want_img, want_mask)
            images = self._augment(images, g) if want_img else None
        else:
            box = self._val_box
            if want_img:
                top, left, side = box
                x = self.images[sel, top:top + side, left:left + side].permute(0, 3, 1, 2).float()
                if side != res:
                    x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
                images = self._normalize.nchw_float(x.clamp_(0, 255))
            masks = resize_masks(self.masks[sel], *box, res) if want_mask else None
        if not c.is_imagenet:
            images = self._finish_cifar(images, g) if want_img else None
            if want_mask and c.resize and masks.shape[1:] != (c.resize, c.resize):
                masks = F.interpolate(masks[:, None].float(), size=(c.resize, c.resize), mode="nearest")
                masks = masks[:, 0].to(torch.uint8)
        out = {"image": images, "mask": masks}
        return tuple(out[f] if f in out else (self.labels if f == "label" else self.indices)[sel]
                     for f in c.fields)

    def _finish_cifar(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` crops -> the normalised batch, resized and augmented as asked."""
        c = self.config
        if not (c.resize or c.augments):
            return self._normalize.nhwc(images)  # the plain path: one conversion pass
        x = images.permute(0, 3, 1, 2).float()
        if c.resize and x.shape[2:] != (c.resize, c.resize):
            shrink = c.resize < min(x.shape[2:])
            x = F.interpolate(x, size=(c.resize, c.resize), mode="bilinear", align_corners=False, antialias=shrink)
            x = x.clamp_(0, 255)
        return self._augment(x, g)

    def _translate_flip(self, sel, g, want_img, want_mask):
        """Pad-and-crop (a random shift of up to ``crop_padding`` pixels each way) and flip as one
        ``index_select`` per batch: each output pixel's row in the flat pixel table, the border
        read by reflection or pointed at the fill row."""
        c, dev = self.config, self.config.device
        b = len(sel)
        h, w = self._image_size
        p = c.crop_padding
        draws = _host_zeros((3, b), torch.int64, dev)  # flip, dy, dx: one copy to the device
        draws[0] = torch.rand(b, generator=g) < 0.5
        if p:
            draws[1:] = torch.randint(-p, p + 1, (2, b), generator=g)
        flip, dy, dx = draws.to(dev, non_blocking=True)
        flip = flip.bool()
        rows = torch.arange(h, device=dev)[None] + dy[:, None]  # [B, H] source rows
        ar_w = torch.arange(w, device=dev)[None]
        cols = torch.where(flip[:, None], w - 1 - ar_w, ar_w) + dx[:, None]  # [B, W] source columns
        fill_row = self.dataset_size * h * w
        if c.padding_mode == "reflect":
            rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
            cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
            rows = rows * w
        else:  # outside the image: an offset past the table, clamped onto the fill row below
            rows = torch.where((rows >= 0) & (rows < h), rows * w, fill_row + 1)
            cols = torch.where((cols >= 0) & (cols < w), cols, fill_row + 1)
        # int32 positions while the table allows: half the bytes of the widest per-batch tensor
        itype = torch.int32 if fill_row < 2**31 - 2 else torch.int64
        base = (sel * (h * w))[:, None, None].to(itype) + rows[:, :, None].to(itype)  # [B, H, 1]
        at = (base + cols[:, None, :].to(itype)).view(-1)
        if c.padding_mode == "fill":
            at = at.clamp_(max=fill_row)
        return self._gather(at, b, want_img, want_mask)

    def _gather(self, at: torch.Tensor, b: int, want_img: bool, want_mask: bool):
        """uint8 images ``[B, H, W, 3]`` and masks of the pixels at flat positions ``at`` ([B*H*W])."""
        h, w = self._image_size
        images = masks = None
        if want_img:
            rgba = self._pixels.index_select(0, at).view(torch.uint8).view(b, h, w, 4)
            images = rgba[..., :3]
        if want_mask:
            masks = self._mask_pixels.index_select(0, at).view(b, h, w)
        return images, masks

    def _random_resized_crop(self, sel, g, res, want_img, want_mask):
        """torchvision's RandomResizedCrop box rule (ten tries, then the centre fallback) drawn for
        the whole batch at once, then one ``grid_sample`` with the flip folded into the affine map
        (two for ``interpolation="random"``: bilinear and bicubic, selected per image)."""
        dev = self.config.device
        interpolation = self.config.interpolation
        b = len(sel)
        h, w = self._image_size
        tries = 10
        area = torch.empty(b, tries).uniform_(*RRC_SCALE, generator=g) * (h * w)
        log_r = torch.empty(b, tries).uniform_(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), generator=g)
        ratio = log_r.exp()
        cw = (area * ratio).sqrt().round()
        ch = (area / ratio).sqrt().round()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
        cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
        u = torch.rand(b, 2, generator=g)
        top = (u[:, 0] * (h - ch + 1)).floor()
        left = (u[:, 1] * (w - cw + 1)).floor()
        # no try fitted: the largest centred box with an allowed aspect ratio
        in_ratio = w / h
        fw, fh = (w, round(w / RRC_RATIO[0])) if in_ratio < RRC_RATIO[0] else \
            (round(h * RRC_RATIO[1]), h) if in_ratio > RRC_RATIO[1] else (w, h)
        miss = ~ok.any(1)
        cw, ch = torch.where(miss, float(fw), cw), torch.where(miss, float(fh), ch)
        top, left = torch.where(miss, float((h - fh) // 2), top), torch.where(miss, float((w - fw) // 2), left)
        flip = torch.rand(b, generator=g) < 0.5
        bicubic = None
        if interpolation == "random":  # drawn after the boxes and flips, which stay as without it
            bicubic = _host_zeros((b, 1, 1, 1), torch.bool, dev)
            bicubic.view(-1).copy_(torch.rand(b, generator=g) < 0.5)
        # align_corners=False: normalised -1 / +1 are the outer edges of the first / last pixel
        theta = _host_zeros((b, 2, 3), torch.float32, dev)
        theta[:, 0, 0] = torch.where(flip, -cw / w, cw / w)
        theta[:, 0, 2] = (2 * left + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * top + ch) / h - 1
        grid = F.affine_grid(theta.to(dev, non_blocking=True), [b, 1, res, res], align_corners=False)
        images = masks = None
        if want_img:  # float 0..255: normalised by the caller, after any RandAugment
            x = self.images[sel].permute(0, 3, 1, 2).float()
            images = _resample(x, grid, interpolation, bicubic)
        if want_mask:
            m = F.grid_sample(self.masks[sel][:, None].float(), grid, mode="nearest", padding_mode="border",
                              align_corners=False)
            masks = m[:, 0].to(torch.uint8)
        return images, masks


def _resample(x: torch.Tensor, grid: torch.Tensor, interpolation: str,
              bicubic: Optional[torch.Tensor]) -> torch.Tensor:
    """``grid_sample`` of float 0..255 images at ``grid``: bilinear, bicubic (its overshoot clamped
    to 0..255, the range of the uint8 source) or, for ``"random"``, bicubic where the host bool
    ``bicubic`` ``[B, 1, 1, 1]`` is set and bilinear elsewhere."""
    def sample(mode: str) -> torch.Tensor:
        out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
        return out.clamp_(0, 255) if mode == "bicubic" else out

    if interpolation != "random":
        return sample(interpolation)
    return torch.where(bicubic.to(x.device, non_blocking=True), sample("bicubic"), sample("bilinear"))


def _host_zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A CPU tensor for a batch's random draws: pinned when they go to a CUDA device, so the copy
    there (``non_blocking=True``) does not make the host wait for the GPU."""
    return torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")


def _tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.from_numpy(np.ascontiguousarray(x))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__} ({exc})") from None
