"""Batched augmentations on the device: timm's RandAugment and RandomErasing for both loaders
(:class:`BatchAugment`, which the device-resident :class:`~.device_loader.DeviceLoader` and the
FFCV-backed :class:`~.loaders.FFCVLoader` apply after their crop and flip), and mixup / cutmix
with label smoothing for the training step (:class:`BatchMix`).

Each follows timm's definition (``timm.data.auto_augment``, ``random_erasing``, ``mixup``) but
runs on a whole batch at once. RandAugment's and RandomErasing's draws (which op, which box) come
from the loader's seeded per-batch CPU ``torch.Generator``, so they are known on the host and no
batch waits for the device to decide; the pixels are computed on the device. :class:`BatchMix`
draws on the device (a generator seeded per step), so the training step never syncs.

RandAugment's ops give PIL's pixels exactly (the tests compare every op with PIL): they compute
on float images holding uint8 values, with PIL's integer look-up tables, its float32 blends
truncated to integers, and its float64 bilinear affine transform. The one difference from timm:
geometric ops always resample bilinearly, where timm picks bilinear or bicubic at random per op.
Posterize with 0 bits (magnitude 10 of the increasing variant) gives black, as older Pillow did
(recent Pillow refuses it).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._loading import LoaderConfig, Normalizer, seed_for

__all__ = ["MIX_STREAM", "RAND_AUGMENT_OPS", "BatchAugment", "BatchMix", "RandAugment", "RandAugmentSpec",
           "RandomErasing", "parse_rand_augment"]

#: timm's ``_RAND_TRANSFORMS``; with ``inc1`` the five marked ops take their "Increasing"
#: variant, whose severity grows with the magnitude (``_RAND_INCREASING_TRANSFORMS``).
RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                    "TranslateYRel")
_INCREASING = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
_LEVEL_DENOM = 10.0
#: The :func:`~._loading.seed_for` stream of :class:`BatchMix`'s per-step draws.
MIX_STREAM = 3


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string (see :func:`parse_rand_augment`)."""

    magnitude: float = 10.0
    num_layers: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = _LEVEL_DENOM
    increasing: bool = False
    prob: float = 0.5


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """timm's RandAugment string, e.g. ``"rand-m9-mstd0.5-inc1"`` (DeiT's and the PAT/OFA ViT
    recipes'): ``m`` magnitude (0-10), ``n`` ops per image, ``mstd`` magnitude noise (over 100:
    uniform in [0, m]), ``mmax`` magnitude bound, ``inc`` 1 for the increasing op variants, ``p``
    probability of each op. (timm reads ``inc0`` as on as well; here 0 is off.)

    Args:
        spec: the string.

    Returns:
        The spec.

    Raises:
        ValueError: not ``rand-...``, an unknown or malformed section (weighted op sets, ``t...``,
            are not supported).
    """
    parts = str(spec).split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-' (e.g. 'rand-m9-mstd0.5-inc1')")
    values = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
        if not match:
            raise ValueError(f"RandAugment spec {spec!r}: unknown section {part!r}; sections are m<magnitude>, "
                             "n<ops>, mstd<std>, mmax<max>, inc<0|1>, p<prob>")
        values[match.group(1)] = float(match.group(2))
    std = values.get("mstd", 0.0)
    out = RandAugmentSpec(magnitude=values.get("m", _LEVEL_DENOM), num_layers=int(values.get("n", 2)),
                          magnitude_std=math.inf if std > 100 else std,
                          magnitude_max=values.get("mmax", _LEVEL_DENOM), increasing=bool(values.get("inc", 0)),
                          prob=values.get("p", 0.5))
    if out.num_layers < 1 or not 0 <= out.prob <= 1:
        raise ValueError(f"RandAugment spec {spec!r}: n must be >= 1 and p in [0, 1]")
    return out


# ---------------------------------------------------------------------------------- RandAugment


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of integer-valued RGB ``[N, 3, H, W]``: ``[N, 1, H, W]``."""
    xi = x.to(torch.int64)
    return ((xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 0x8000) >> 16).to(x.dtype)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)`` in float32, truncated to uint8 values."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp_(0, 255).floor_()


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per image and channel look-up: ``lut`` is ``[N, 3, 256]`` (or broadcastable to it)."""
    n = x.shape[0]
    lut = lut.expand(n, 3, 256).reshape(n * 3, 256).to(x.dtype)
    return lut.gather(1, x.reshape(n * 3, -1).to(torch.int64)).view_as(x)


def _levels(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(256, device=x.device, dtype=torch.float64).view(1, 1, 256)


def _auto_contrast(x, _arg):
    lo = x.amin(dim=(2, 3)).double().unsqueeze(2)  # [N, 3, 1]
    hi = x.amax(dim=(2, 3)).double().unsqueeze(2)
    span = (hi - lo).clamp_min(1)
    scale = torch.full_like(span, 255.0) / span  # a true division, as PIL's (255 / t is 255 * (1 / t))
    lut = (_levels(x) * scale - lo * scale).floor().clamp(0, 255)
    return _apply_lut(x, torch.where(hi > lo, lut, _levels(x)))


def _equalize(x, _arg):
    n = x.shape[0]
    flat = x.reshape(n * 3, -1).to(torch.int64)
    hist = torch.zeros(n * 3, 256, dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    top = flat.amax(1, keepdim=True)  # PIL's histo[-1]: the count of the highest value present
    step = (flat.shape[1] - hist.gather(1, top)) // 255
    before = hist.cumsum(1) - hist
    lut = (step // 2 + before) // step.clamp_min(1)
    levels = torch.arange(256, device=x.device)
    lut = torch.where(step > 0, lut, levels).clamp(max=255)
    return _apply_lut(x, lut.view(n, 3, 256))


def _invert(x, _arg):
    return 255 - x


def _posterize(x, bits):
    shift = (8 - bits.clamp(0, 8)).view(-1, 1, 1)  # PIL masks the low 8 - bits bits
    unit = torch.pow(2.0, shift.double())
    return _apply_lut(x, (_levels(x) / unit).floor() * unit)


def _solarize(x, threshold):
    t = threshold.double().view(-1, 1, 1)
    return _apply_lut(x, torch.where(_levels(x) < t, _levels(x), 255 - _levels(x)))


def _solarize_add(x, add):
    levels = _levels(x)
    return _apply_lut(x, torch.where(levels < 128, (levels + add.double().view(-1, 1, 1)).clamp(max=255), levels))


def _color(x, factor):
    return _blend(_luma(x), x, factor)


def _contrast(x, factor):
    mean = torch.floor(_luma(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).to(x.dtype)
    return _blend(mean, x, factor)


def _brightness(x, factor):
    return _blend(torch.zeros_like(x[:, :1, :1, :1]), x, factor)


def _sharpness(x, factor):
    # PIL's SMOOTH filter (weights 1, centre 5, over 13) on the inner pixels, rounded; the
    # 1-pixel border stays as it was
    kernel = torch.full((3, 1, 3, 3), 1 / 13, device=x.device, dtype=x.dtype)
    kernel[:, :, 1, 1] = 5 / 13
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = torch.floor(F.conv2d(x, kernel, groups=3) + 0.5).clamp_(0, 255)
    return _blend(smooth, x, factor)


_POINT_OPS = {"AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert, "Posterize": _posterize,
              "Solarize": _solarize, "SolarizeAdd": _solarize_add, "Color": _color, "Contrast": _contrast,
              "Brightness": _brightness, "Sharpness": _sharpness}


def _affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's bilinear ``Image.transform(AFFINE)`` of each image: ``matrix [N, 2, 3]`` maps an
    output pixel's centre to its input point in pixel units (pixel centres at +0.5); points
    outside the image take ``fill``. PIL's arithmetic: float64, ``a + (b - a) * t`` interpolation,
    neighbours clamped at the border, the result truncated."""
    n, c, h, w = x.shape
    m = matrix.to(torch.float64).view(n, 6, 1, 1).unbind(1)
    ys = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w) + 0.5
    px = m[0] * xs + m[1] * ys + m[2]  # [N, H, W] input points
    py = m[3] * xs + m[4] * ys + m[5]
    inside = ((px >= 0) & (px < w) & (py >= 0) & (py < h)).unsqueeze(1)
    px, py = px - 0.5, py - 0.5
    x0, y0 = px.floor(), py.floor()
    dx, dy = (px - x0).unsqueeze(1), (py - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    xa, xb = x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1)
    ya, yb = y0.clamp(0, h - 1), (y0 + 1).clamp(0, h - 1)
    flat = x.to(torch.float64).reshape(n, c, h * w)

    def at(yy, xx):
        return flat.gather(2, (yy * w + xx).view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)

    top_a, bottom_a = at(ya, xa), at(yb, xa)
    upper = top_a + (at(ya, xb) - top_a) * dx
    lower = bottom_a + (at(yb, xb) - bottom_a) * dx
    lower = torch.where(((y0 + 1 >= 0) & (y0 + 1 < h)).unsqueeze(1), lower, upper)
    value = (upper + (lower - upper) * dy).floor_().clamp_(0, 255)
    return torch.where(inside, value.to(x.dtype), fill.view(1, 3, 1, 1))


class RandAugment:
    """timm's RandAugment on a batch of images: each image gets ``num_layers`` ops drawn from
    :data:`RAND_AUGMENT_OPS` (with replacement), each applied with probability ``prob`` at a
    magnitude drawn around ``magnitude``.

    Args:
        spec: a :class:`RandAugmentSpec` or its string (``"rand-m9-mstd0.5-inc1"``).
        fill: the colour of the pixels geometric ops bring in, 0..255 per channel (timm: the
            dataset mean).
    """

    def __init__(self, spec, fill: Sequence[float] = (128, 128, 128)):
        self.spec = parse_rand_augment(spec) if isinstance(spec, str) else spec
        self.fill = tuple(float(round(v)) for v in fill)

    def draw(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The ops and their arguments for ``b`` images, from the CPU generator ``g``.

        Returns:
            ``(ops [L, B] int64, args [L, B] float64)``: op index into :data:`RAND_AUGMENT_OPS`
            (-1: the layer does nothing to that image) and its argument (degrees, shear,
            translation fraction, bits, threshold, addend or enhance factor).
        """
        s = self.spec
        layers = s.num_layers
        ops = torch.randint(len(RAND_AUGMENT_OPS), (layers, b), generator=g)
        skip = torch.rand(layers, b, generator=g, dtype=torch.float64) > s.prob
        noise = torch.randn(layers, b, generator=g, dtype=torch.float64)
        negate = torch.rand(layers, b, generator=g, dtype=torch.float64) > 0.5
        if s.magnitude_std == math.inf:
            level = torch.rand(layers, b, generator=g, dtype=torch.float64) * s.magnitude
        elif s.magnitude_std > 0:
            level = s.magnitude + s.magnitude_std * noise
        else:
            level = torch.full((layers, b), float(s.magnitude), dtype=torch.float64)
        level = level.clamp(0, s.magnitude_max or _LEVEL_DENOM) / _LEVEL_DENOM
        sign = torch.where(negate, -1.0, 1.0).to(torch.float64)
        args = torch.zeros(layers, b, dtype=torch.float64)
        for k, name in enumerate(RAND_AUGMENT_OPS):
            sel = ops == k
            args[sel] = self._argument(name, level[sel], sign[sel])
        return torch.where(skip, -1, ops), args

    def _argument(self, name: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """timm's ``LEVEL_TO_ARG`` of op ``name`` (``level`` = magnitude / 10)."""
        inc = self.spec.increasing and name in _INCREASING
        if name == "Rotate":
            return level * 30 * sign
        if name in ("ShearX", "ShearY"):
            return level * 0.3 * sign
        if name in ("TranslateXRel", "TranslateYRel"):
            return level * 0.45 * sign
        if name == "Posterize":
            bits = (level * 4).floor()
            return 4 - bits if inc else bits
        if name == "Solarize":
            threshold = (level * 256).floor().clamp(max=256)
            return 256 - threshold if inc else threshold
        if name == "SolarizeAdd":
            return (level * 110).floor().clamp(max=128)
        if name in ("Color", "Contrast", "Brightness", "Sharpness"):
            return (1 + level * 0.9 * sign).clamp(min=0.1) if inc else level * 1.8 + 0.1
        return torch.zeros_like(level)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Augment ``x`` (float ``[B, 3, H, W]`` in 0..255, on any device) with draws from ``g``.

        Returns:
            A new float tensor of integer values in 0..255.
        """
        ops, args = self.draw(x.shape[0], g)
        x = x.round().clamp_(0, 255)
        for layer_ops, layer_args in zip(ops, args):
            x = self._layer(x, layer_ops, layer_args)
        return x

    def _layer(self, x: torch.Tensor, ops: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
        dev = x.device
        _, _, h, w = x.shape
        # one host-to-device copy of the layer's plan: image rows grouped by op, and arguments
        order = torch.argsort(ops, stable=True)
        counts = torch.bincount(ops + 1, minlength=len(RAND_AUGMENT_OPS) + 1).tolist()
        plan = _to_device(torch.cat([order.double(), args[order], torch.tensor(self.fill, dtype=torch.float64)]), dev)
        b = len(ops)
        rows_all, args_all, fill = plan[:b].long(), plan[b:2 * b], plan[2 * b:].to(x.dtype)
        start = counts[0]  # ops == -1 come first: nothing to do
        geometric = []
        for k, name in enumerate(RAND_AUGMENT_OPS):
            n = counts[k + 1]
            rows, arg = rows_all[start:start + n], args_all[start:start + n]
            start += n
            if n == 0:
                continue
            if name in _GEOMETRIC:
                geometric.append((name, rows, arg))
                continue
            x = x.index_copy(0, rows, _POINT_OPS[name](x.index_select(0, rows), arg.to(x.dtype)))
        if geometric:
            rows = torch.cat([r for _, r, _ in geometric])
            matrix = torch.cat([self._matrix(name, arg, h, w) for name, _, arg in geometric])
            x = x.index_copy(0, rows, _affine(x.index_select(0, rows), matrix, fill))
        return x

    @staticmethod
    def _matrix(name: str, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """PIL's affine data ``(a, b, c, d, e, f)`` of the op (output point -> input point)."""
        one, zero = torch.ones_like(arg), torch.zeros_like(arg)
        if name == "Rotate":  # PIL's rotate: counter-clockwise about the centre (w / 2, h / 2)
            angle = -torch.deg2rad(arg)
            cos, sin = torch.cos(angle), torch.sin(angle)
            cx, cy = w / 2, h / 2
            rows = [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy]
        elif name == "ShearX":
            rows = [one, arg, zero, zero, one, zero]
        elif name == "ShearY":
            rows = [one, zero, zero, arg, one, zero]
        elif name == "TranslateXRel":
            rows = [one, zero, arg * w, zero, one, zero]
        else:  # TranslateYRel
            rows = [one, zero, zero, zero, one, arg * h]
        return torch.stack(rows, 1).view(-1, 2, 3)


# ---------------------------------------------------------------------------------- RandomErasing


class RandomErasing:
    """timm's ``RandomErasing(probability, mode="pixel")`` on a normalised batch: with
    probability ``prob`` an image gets one box of area 2%-33% of it and aspect ratio 0.3-3.3
    (ten tries to fit, else none) filled with per-pixel, per-channel standard normal noise.

    Args:
        prob: the probability per image.
        min_area, max_area: the box's area range, as fractions of the image.
        min_aspect: the aspect-ratio range is ``[min_aspect, 1 / min_aspect]`` (log-uniform).
    """

    TRIES = 10

    def __init__(self, prob: float, min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        self.prob = float(prob)
        self.area = (min_area, max_area)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def boxes(self, b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        """``[4, B]`` int64 ``(top, left, height, width)`` per image from the CPU generator ``g``
        (height 0: not erased)."""
        erase = torch.rand(b, generator=g, dtype=torch.float64) <= self.prob  # timm: skip if u > p
        area = torch.empty(b, self.TRIES, dtype=torch.float64).uniform_(*self.area, generator=g) * (h * w)
        aspect = torch.empty(b, self.TRIES, dtype=torch.float64).uniform_(*self.log_aspect, generator=g).exp()
        bh = (area * aspect).sqrt().round()
        bw = (area / aspect).sqrt().round()
        fits = (bw < w) & (bh < h)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)
        bh, bw = bh.gather(1, first)[:, 0], bw.gather(1, first)[:, 0]
        u = torch.rand(2, b, generator=g, dtype=torch.float64)
        top = (u[0] * (h - bh + 1)).floor()  # randint(0, h - bh), both ends included
        left = (u[1] * (w - bw + 1)).floor()
        on = erase & fits.any(1)
        return torch.stack([top, left, torch.where(on, bh, 0.0), torch.where(on, bw, 0.0)]).long()

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Erase boxes of the normalised batch ``x`` ``[B, 3, H, W]`` (in place where it can).

        The boxes come from the CPU generator ``g``; the noise from a generator on ``x``'s
        device seeded from ``g``, drawn only when some image is erased.
        """
        b, _, h, w = x.shape
        boxes = self.boxes(b, h, w, g)
        noise_seed = int(torch.randint(2**62, (1,), generator=g))
        if not bool((boxes[2] > 0).any()):
            return x
        top, left, bh, bw = _to_device(boxes, x.device)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + bh).view(-1, 1, 1))
                  & (xs >= left.view(-1, 1, 1)) & (xs < (left + bw).view(-1, 1, 1))).unsqueeze(1)
        noise_gen = torch.Generator(device=x.device).manual_seed(noise_seed)
        noise = torch.randn(x.shape, generator=noise_gen, device=x.device, dtype=torch.float32)
        return torch.where(inside, noise.to(x.dtype), x)


# ---------------------------------------------------------------------------------- both loaders


class BatchAugment:
    """What follows a training batch's crop and flip in both loaders, in timm's order:
    RandAugment (on the uint8 values), normalisation, random erasing; each as configured.

    Args:
        config: the loader's options (``randaugment``, ``random_erasing``, ``mean`` as
            RandAugment's fill colour).
        normalize: the loader's :class:`~._loading.Normalizer`.
    """

    def __init__(self, config: LoaderConfig, normalize: Normalizer):
        self.normalize = normalize
        self.rand_augment = RandAugment(config.randaugment, fill=config.mean) if config.randaugment else None
        self.erasing = RandomErasing(config.random_erasing) if config.random_erasing else None

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Augment and normalise a batch.

        Args:
            x: float ``[B, 3, H, W]`` in 0..255 (any device).
            g: the batch's CPU generator (:func:`~._loading.batch_generator`): RandAugment's draws,
                then the erasing boxes, from it.

        Returns:
            The normalised batch in the loader's dtype and memory format.
        """
        if self.rand_augment is not None:
            x = self.rand_augment(x, g)
        x = self.normalize.nchw_float(x)
        if self.erasing is not None:
            x = self.erasing(x, g)
        return x

    def nhwc(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The same from uint8 ``[B, H, W, 3]`` crops (as a decoder yields them)."""
        return self(images.permute(0, 3, 1, 2).float(), g)


# ---------------------------------------------------------------------------------- mixup / cutmix


class BatchMix:
    """timm's ``Mixup`` (``mode="batch"``) with label smoothing, on the device: the targets
    become probabilities ``[B, C]``.

    Per batch: with probability ``mix_prob`` the batch is mixed with itself reversed
    (``x.flip(0)``), by cutmix with probability ``switch_prob`` when both are on, else mixup;
    ``lam`` ~ Beta(alpha, alpha) of the chosen one. Mixup blends ``lam * x + (1 - lam) * x_rev``;
    cutmix pastes a box of ``x_rev`` of side ``sqrt(1 - lam)`` of the image's, centred at a
    uniform pixel and clipped at the borders, and ``lam`` becomes the kept area. The targets are
    ``lam * smooth(y) + (1 - lam) * smooth(y_rev)`` with ``smooth(y) = (1 - e) onehot(y) + e / C``.

    All draws come from a generator on the device, seeded per step from ``(seed, rank, step)``:
    no host sync, the same draws whenever a step is run again (a resumed run), and usable inside
    a captured CUDA graph's inputs path. With only label smoothing the images pass through.

    Args:
        num_classes: the width of the targets.
        mixup, cutmix: the Beta parameters alpha (0: that kind off).
        mix_prob: the probability of mixing a batch.
        switch_prob: the probability of cutmix rather than mixup when both are on.
        label_smoothing: ``e``.
        seed, rank: the run's seed and this process's rank.
    """

    def __init__(self, num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0, mix_prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0, seed: int = 0, rank: int = 0):
        self.num_classes = int(num_classes)
        self.mixup, self.cutmix = float(mixup), float(cutmix)
        self.mix_prob, self.switch_prob = float(mix_prob), float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.seed, self.rank = int(seed), int(rank)
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def mixes(self) -> bool:
        """Whether images are mixed (else only the targets are smoothed)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        return g.manual_seed(seed_for(self.seed, MIX_STREAM, self.rank, step))

    def params(self, step: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``step``'s draws for ``h x w`` images: ``(lam, cut, box)``, 0-d float32 ``lam``
        (the weight of the unflipped batch, 1 when not mixed), 0-d bool ``cut`` and the int64
        ``box`` ``[4]`` ``(top, bottom, left, right)``; all on ``device``."""
        device = torch.device(device)
        g = self._generator(device, step)
        u = torch.rand(4, generator=g, device=device, dtype=torch.float64)  # apply, switch, centre y, x
        # (built by fills, not copied from the host: a copy could wait for the device)
        alphas = torch.full((4,), self.cutmix or 1.0, dtype=torch.float64, device=device)
        alphas[2:] = self.mixup or 1.0  # the unused kind's placeholder keeps the division finite
        gam = torch._standard_gamma(alphas, generator=g)
        beta_cut, beta_mix = gam[0] / (gam[0] + gam[1]), gam[2] / (gam[2] + gam[3])
        if self.mixup > 0 and self.cutmix > 0:
            cut = u[1] < self.switch_prob
        else:
            cut = torch.full((), self.cutmix > 0, device=device)
        lam = torch.where(cut, beta_cut, beta_mix)
        ratio = (1 - lam).clamp_min(0).sqrt()
        cut_h, cut_w = (h * ratio).floor().long(), (w * ratio).floor().long()
        cy, cx = (u[2] * h).floor().long(), (u[3] * w).floor().long()
        box = torch.stack([(cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h),
                           (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)])
        lam_cut = 1 - ((box[1] - box[0]) * (box[3] - box[2])).double() / (h * w)
        apply = u[0] < self.mix_prob
        lam = torch.where(apply, torch.where(cut, lam_cut, lam), 1.0)
        return lam.float(), cut & apply, box

    def targets(self, labels: torch.Tensor, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Smoothed one-hot targets ``[B, C]`` float32, mixed with the reversed batch's by ``lam``."""
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off
        y = torch.full((labels.shape[0], self.num_classes), off, device=labels.device, dtype=torch.float32)
        y.scatter_(1, labels.view(-1, 1), on)
        return y if lam is None else y * lam + y.flip(0) * (1 - lam)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch.

        Args:
            images: ``[B, C, H, W]`` on the device.
            labels: class indices ``[B]``.
            step: the step's number (the draws' seed; the same step gives the same mix).

        Returns:
            ``(images, targets)``: the mixed images (same dtype and layout) and the ``[B, C]``
            float32 targets.
        """
        if not self.mixes:
            return images, self.targets(labels)
        _, _, h, w = images.shape
        lam, cut, box = self.params(step, h, w, images.device)
        x = images.float()
        x_rev = x.flip(0)
        ys = torch.arange(h, device=x.device).view(h, 1)
        xs = torch.arange(w, device=x.device).view(1, w)
        in_box = cut & (ys >= box[0]) & (ys < box[1]) & (xs >= box[2]) & (xs < box[3])
        blend = torch.where(cut, 1.0, lam)  # cutmix keeps the pixels outside the box
        mixed = torch.where(in_box, x_rev, x * blend + x_rev * (1 - blend))
        mixed = mixed.to(images.dtype, memory_format=_memory_format(images))
        return mixed, self.targets(labels, lam)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor of draws on ``device``, copied from pinned memory on CUDA (the host does not
    wait for the device)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
