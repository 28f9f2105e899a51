"""`kdengine bench data`: images per second of the FFCV ImageNet training pipeline against the
loader a user would otherwise write (PIL decode + RandomResizedCrop + flip in a
``torch.utils.data.DataLoader``), with the same number of workers, on the same ImageNet-like JPEGs.

The comparison (the data-loading row of docs/performance.md):

* **image set**: ``num_images`` JPEGs at quality 90, sizes drawn around 400x350 (300-500 wide,
  260-440 high, like ImageNet's average), ten class folders; photo-like content (smooth colour
  fields over a multi-octave texture with grain, about 50-70 KB a file). Generated once,
  deterministically, and cached under ``cache_dir()/bench-jpeg-<key>/`` keyed by its
  parameters, with the ``.beton`` written from the same files (``write_mode="jpg"`` by default:
  every image stays a JPEG of the same quality, so both sides decode JPEG).
* **FFCV side**: :func:`kdengine.data.loaders.make_loader` with ``pipeline="imagenet_train"``
  (RandomResizedCrop decoded straight to 224, random flip, FFCV threads) on the CPU.
* **baseline**: a ``Dataset`` reading the JPEG files with PIL (``convert("RGB")``), the
  torchvision RandomResizedCrop rule (scale 0.08-1, ratio 3/4-4/3, ten tries then a centre crop)
  as one PIL ``resize(box=...)`` to 224 (bilinear), a random flip, a ``uint8`` HWC tensor;
  ``DataLoader(shuffle=True, drop_last=True, persistent_workers=True)``, default collate.
* **same output**: both end as ``float32 [B, 3, 224, 224]`` contiguous, normalised with the
  ImageNet mean/std in the main process (the baseline by the same ops the FFCV loader applies:
  NHWC uint8 -> NCHW contiguous -> float -> ``(x - mean) / std``), so the timed work ends at the
  same tensor.
* **timing**: one warm-up epoch per side first (worker start-up, FFCV's JIT compilation, page
  cache), excluded; then ``epochs`` timed epochs per side, the sides in alternation (order
  swapped every round) so drift of a shared machine lands on both. img/s of an epoch = images
  delivered / wall time from ``iter()`` to the last batch. Reported: median and p20/p80 and
  min/max over the timed epochs, and the ratio of the medians. Also the CPU time per image (the
  FFCV process's threads; the baseline's main process plus its worker processes, from /proc),
  which other load on a shared machine disturbs far less than wall time, and the 1-minute load
  average at the start and end of the run.

Rows are appended to ``config.output``, one per loader per run; the command line's default is
``./kdengine-bench/data.csv`` (:func:`kdengine.bench.results.default_output`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RRC_RATIO,
    RRC_SCALE,
    WRITE_MODES,
    cache_dir,
    make_loader,
    scan_image_folder,
    write_image_folder,
)
from ..errors import SettingError
from .results import append_rows, provenance
from .timing import percentile

RESOLUTION = 224
#: bump when the generated image set changes (it is part of the cache key)
JPEG_SET_VERSION = 1


# ------------------------------------------------------------------------- the image set


@dataclass(frozen=True)
class JpegSetSpec:
    """An ImageNet-like set of JPEG files; equal specs give identical files."""

    num_images: int = 3000
    num_classes: int = 10
    width: tuple = (300, 500)  # inclusive range of widths
    height: tuple = (260, 440)
    quality: int = 90
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"version": JPEG_SET_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return f"bench-jpeg-v{JPEG_SET_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


_BANK = 1024  # side of the shared texture the images are cut from


def _smooth(rng: np.random.Generator, cells_h: int, cells_w: int, w: int, h: int) -> np.ndarray:
    """Random colour values on a coarse grid, bicubically upsampled to ``h x w``, centred at 0."""
    from PIL import Image

    grid = rng.integers(0, 256, (cells_h, cells_w, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32) - 127.5


def _texture_bank(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1])
    bank = np.zeros((_BANK, _BANK, 3), np.float32)
    for cells, amp in ((12, 0.35), (40, 0.3), (128, 0.25), (400, 0.18)):  # coarse to fine octaves
        bank += amp * _smooth(rng, cells, cells, _BANK, _BANK)
    bank += rng.normal(0.0, 8.0, bank.shape).astype(np.float32)  # grain
    return bank


def _write_image(bank: np.ndarray, spec: JpegSetSpec, i: int, path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng([spec.seed, 2, i])
    w = int(rng.integers(spec.width[0], spec.width[1] + 1))
    h = int(rng.integers(spec.height[0], spec.height[1] + 1))
    y, x = int(rng.integers(0, _BANK - h + 1)), int(rng.integers(0, _BANK - w + 1))
    img = bank[y:y + h, x:x + w] * rng.uniform(0.6, 1.4) + 0.5 * _smooth(rng, 3, 4, w, h) + 128.0
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=spec.quality)


def jpeg_set(spec: JpegSetSpec, root: Optional[Path] = None, workers: Optional[int] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """The ImageFolder tree of an image set, generated on first use into a temporary folder that
    is renamed into place when complete.

    Args:
        spec: the image set.
        root: the folder to keep it in (default: ``cache_dir()/<spec.key()>``).
        workers: generator threads (default: the CPU count).
        progress: called as ``progress(done, total)`` while the images are written.

    Returns:
        ``<root>/images`` (holding ``<class>/<i>.jpg``).
    """
    from concurrent.futures import ThreadPoolExecutor

    if spec.num_images < spec.num_classes or spec.num_classes < 1:
        raise ValueError(f"num_images ({spec.num_images}) must be at least num_classes ({spec.num_classes}) >= 1")
    if min(spec.width + spec.height) < 32 or max(spec.width + spec.height) > _BANK:
        raise ValueError(f"image sides must be in 32..{_BANK}")
    root = Path(root) if root is not None else cache_dir() / spec.key()
    images = root / "images"
    if images.is_dir():
        return images
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".images.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(spec.num_classes):
        (tmp / f"class{c:02d}").mkdir(parents=True)
    bank = _texture_bank(spec.seed)
    paths = [tmp / f"class{i % spec.num_classes:02d}" / f"{i:06d}.jpg" for i in range(spec.num_images)]
    try:
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:  # PIL and NumPy release the GIL
            for done, _ in enumerate(pool.map(lambda a: _write_image(bank, spec, *a), enumerate(paths)), 1):
                if progress:
                    progress(done, spec.num_images)
        try:
            os.rename(tmp, images)
        except OSError:  # another process finished first
            if not images.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return images


def jpeg_beton(spec: JpegSetSpec, write_mode: str = "jpg", root: Optional[Path] = None,
               workers: Optional[int] = None, progress=None) -> Path:
    """The ``.beton`` of an image set, written from the same files at the same JPEG quality and
    cached next to them.

    Args:
        spec, root, workers, progress: as for :func:`jpeg_set`.
        write_mode: how the ``.beton`` stores the images (``kdengine.data.WRITE_MODES``).

    Returns:
        The ``.beton`` path.
    """
    images = jpeg_set(spec, root, workers, progress)
    path = images.parent / f"ffcv-{write_mode}-q{spec.quality}.beton"
    if not path.exists():
        try:
            write_image_folder(images, path, write_mode=write_mode, jpeg_quality=spec.quality,
                               num_workers=workers)
        except FileExistsError:  # another process finished first
            pass
    return path


# ------------------------------------------------------------------------- the baseline


def random_resized_crop_box(height: int, width: int, rnd: random.Random, scale=RRC_SCALE,
                            ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """A crop box by torchvision's RandomResizedCrop rule: ten tries of a random area share and
    log-uniform aspect ratio, then the centre crop clamped to ``ratio``.

    Args:
        height, width: the image's size.
        rnd: the random source.
        scale: the range of the crop's share of the area.
        ratio: the range of the crop's aspect ratio (width / height).

    Returns:
        ``(top, left, h, w)``, inside the image.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rnd.uniform(scale[0], scale[1])
        aspect = math.exp(rnd.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rnd.randint(0, height - h), rnd.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PILRandomResizedCrop(torch.utils.data.Dataset):
    """What a PyTorch user writes without FFCV: PIL decode, RandomResizedCrop, flip, ``uint8``
    HWC tensor per image (collated to ``[B, H, W, 3]``)."""

    def __init__(self, files: list, size: int = RESOLUTION):
        self.files, self.size = files, size  # random: seeded per worker by the DataLoader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
        top, left, h, w = random_resized_crop_box(img.height, img.width, random)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(img)), label


class Normalize:
    """uint8 NHWC -> float32 NCHW contiguous, ``(x - mean) / std``: the FFCV loader's last step,
    applied to the baseline's batches too."""

    def __init__(self):
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.inv_std = torch.tensor([1 / s for s in IMAGENET_STD]).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.permute(0, 3, 1, 2).contiguous().float().sub_(self.mean).mul_(self.inv_std)


def baseline_loader(images_root: Path, batch_size: int, workers: int):
    """The baseline side: :class:`PILRandomResizedCrop` in a ``DataLoader``, normalised like the
    FFCV side.

    Returns:
        A function that runs one epoch's batches; its ``cpu_seconds()`` counts this process and
        the loader's worker processes.
    """
    files, _ = scan_image_folder(images_root)
    files = [(str(p), label) for p, label in files]
    loader = torch.utils.data.DataLoader(
        PILRandomResizedCrop(files), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=False)
    normalize = Normalize()

    def epoch():
        for x, y in loader:
            yield normalize(x), y

    def cpu_seconds():  # this process (main: collation wait, normalisation) + the worker processes
        workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
        return time.process_time() + sum(_proc_cpu_seconds(w.pid) for w in workers)

    epoch.cpu_seconds = cpu_seconds
    return epoch


def _proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


# ------------------------------------------------------------------------- the FFCV side


def ffcv_loader(beton: Path, batch_size: int, workers: int):
    """The FFCV side: :func:`kdengine.data.make_loader`'s ``imagenet_train`` pipeline on the CPU.

    Returns:
        ``(epoch_fn, implementation)``: a function that starts one epoch's iterator, and the
        name reported in the rows.
    """
    loader = make_loader(beton, pipeline="imagenet_train", batch_size=batch_size, num_workers=workers,
                         device="cpu", resolution=RESOLUTION, channels_last=False)
    return (lambda: iter(loader)), "kdengine.data.loaders.make_loader"


# ------------------------------------------------------------------------- the run


@dataclass
class DataBenchConfig:
    """The settings of one run, checked when constructed (:class:`~kdengine.errors.SettingError`).

    Args:
        num_images: JPEGs in the generated set, at least ``batch_size``.
        workers: DataLoader worker processes and FFCV threads, the same for both (0: all cores).
        batch_size: images per batch.
        epochs: timed epochs per loader, after one warm-up epoch each.
        write_mode: how the ``.beton`` stores the images (``jpg``, ``proportion`` or ``raw``).
        seed: the image set's seed.
        cache_root: where the image set and ``.beton`` are kept (default: the kdengine cache dir).
        output: the CSV to append the rows to, or None for none.
    """

    num_images: int = 3000
    workers: int = 0
    batch_size: int = 64
    epochs: int = 5
    write_mode: str = "jpg"
    seed: int = 0
    cache_root: Optional[str] = None
    output: Optional[str] = None

    def __post_init__(self):
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise SettingError("workers", f"must be 0 (all cores) or more, got {self.workers}")
        if self.num_images < self.batch_size:
            raise SettingError("num_images", f"must be at least the batch size ({self.batch_size}), "
                                             f"got {self.num_images}")
        if self.write_mode not in WRITE_MODES:
            raise SettingError("write_mode", f"must be one of {WRITE_MODES}, got {self.write_mode!r}")


def _run_epoch(epoch_fn) -> tuple[int, float, float, tuple]:
    """(images, wall seconds, CPU seconds, (shape, dtype, contiguous) of the first batch) of one
    full epoch. CPU seconds: ``epoch_fn.cpu_seconds()`` (the baseline: this process and its
    workers), else this process's (FFCV: its threads live here)."""
    cpu = getattr(epoch_fn, "cpu_seconds", time.process_time)
    images, first = 0, None
    c0, t0 = cpu(), time.perf_counter()
    for x, _ in epoch_fn():
        if first is None:
            first = (tuple(x.shape), str(x.dtype).replace("torch.", ""), x.is_contiguous())
        images += x.shape[0]
    t1 = time.perf_counter()
    return images, t1 - t0, cpu() - c0, first


def run(config: DataBenchConfig, progress=None) -> list[dict]:
    """Build (or reuse) the image set and ``.beton``, and time both loaders.

    Args:
        config: the run's settings.
        progress: a ``rich.progress.Progress`` to report to, optional.

    Returns:
        One row per loader, also appended to ``config.output`` when set.
    """
    import importlib.metadata as md

    workers = config.workers or os.cpu_count() or 1
    spec = JpegSetSpec(num_images=config.num_images, seed=config.seed)
    root = Path(config.cache_root) / spec.key() if config.cache_root else None

    task = progress.add_task("image set", total=spec.num_images) if progress else None

    def gen_progress(done, total):
        if progress:
            progress.update(task, completed=done, total=total)

    beton = jpeg_beton(spec, config.write_mode, root, workers, gen_progress)
    images_root = beton.parent / "images"
    sizes = [os.path.getsize(p) for p in images_root.glob("*/*.jpg")]

    loaders = {"pil-dataloader": (baseline_loader(images_root, config.batch_size, workers),
                                  "torch.utils.data.DataLoader + PIL")}
    epoch_fn, impl = ffcv_loader(beton, config.batch_size, workers)
    loaders["ffcv"] = (epoch_fn, impl)
    names = list(loaders)
    if progress:
        progress.update(task, description="warm-up epochs", completed=0, total=len(names) * (1 + config.epochs))
    outputs, rates, seconds, cpu_ms = {}, {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}
    load_start = os.getloadavg()[0]
    for name in names:  # warm-up, excluded
        _, _, _, outputs[name] = _run_epoch(loaders[name][0])
        if progress:
            progress.advance(task)
    if len({outputs[n] for n in names}) != 1:
        raise RuntimeError(f"the loaders' batches differ: {outputs}")
    for rnd in range(config.epochs):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            if progress:
                progress.update(task, description=f"epoch {rnd + 1}/{config.epochs}: {name}")
            n, s, c, _ = _run_epoch(loaders[name][0])
            rates[name].append(n / s)
            seconds[name].append(s)
            cpu_ms[name].append(1e3 * c / n)
            if progress:
                progress.advance(task)

    load_end = os.getloadavg()[0]
    base = provenance(torch.device("cpu"))
    versions = {"ffcv_version": md.version("ffcv"), "pillow_version": md.version("pillow"),
                "numba_version": md.version("numba")}
    medians = {n: statistics.median(rates[n]) for n in names}
    rows = []
    for name in names:
        r = sorted(rates[name])
        shape, dtype, contiguous = outputs[name]
        rows.append({
            **base, **versions,
            "bench": f"imagenet_rrc{RESOLUTION}",
            "loader": name,
            "implementation": loaders[name][1],
            "workers": workers,
            "batch_size": config.batch_size,
            "num_images": spec.num_images,
            "image_sizes": f"{spec.width[0]}-{spec.width[1]}x{spec.height[0]}-{spec.height[1]}",
            "mean_jpeg_kb": round(sum(sizes) / max(len(sizes), 1) / 1024, 1),
            "jpeg_quality": spec.quality,
            "beton_write_mode": config.write_mode,
            "output": f"{dtype} {'x'.join(map(str, shape))} {'contiguous' if contiguous else 'strided'} normalised",
            "epochs": len(r),
            "median_img_s": round(medians[name], 1),
            "p20_img_s": round(percentile(r, 0.2), 1),
            "p80_img_s": round(percentile(r, 0.8), 1),
            "min_img_s": round(r[0], 1),
            "max_img_s": round(r[-1], 1),
            "median_epoch_s": round(statistics.median(seconds[name]), 3),
            "speedup_vs_baseline": round(medians[name] / medians["pil-dataloader"], 3),
            # CPU time per image (all threads / worker processes): robust to other load on the machine
            "cpu_ms_per_img": round(statistics.median(cpu_ms[name]), 3),
            "cpu_efficiency_vs_baseline": round(statistics.median(cpu_ms["pil-dataloader"])
                                                / statistics.median(cpu_ms[name]), 3),
            "loadavg_1m_start": round(load_start, 2),
            "loadavg_1m_end": round(load_end, 2),
        })
    if config.output:
        append_rows(config.output, rows)
    return rows
