"""The pictures of one run (`kdengine viz RUN_DIR`): curves, maps, foreground IoU over the epochs
and calibration, each a PNG with its numbers in JSON beside it in the run directory.

* ``curves.png``: accuracy and loss of every model against epochs (:func:`~.curves.plot_run`).
* ``maps.png``: S, A_co, A_di and the CAMs of the last checkpoint on the first validation images
  (:mod:`~.maps`).
* ``iou.png`` / ``iou.json`` (data with foreground masks, e.g. the embedded dataset): the IoU
  with the object of each model's CAM region and of each pair's similar and discrepant regions
  (thresholds in :mod:`~.regions`), for every kept per-epoch checkpoint (``train.keep_checkpoints``),
  else for the last checkpoint only (ADM paper Fig. 2).
* ``calibration.png`` / ``calibration.json``: reliability diagrams and ECE of every model and
  the ensemble on the whole validation set, for the last checkpoint (:mod:`~.calibration`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..data import CLASSES
from ..engine.checkpoint import epoch_checkpoints
from ..engine.config import num_classes_of
from .calibration import ECE_BINS, calibration_bins, plot_reliability, reliability
from .maps import compute_maps, plot_maps
from .regions import CAM_THRESHOLD, cam_region, iou, mean_iou, similarity_regions
from .runs import load_checkpoint, validation_data
from .segmaps import compute_segmentation_maps, object_iou_scores, plot_segmentation_maps

#: What `kdengine viz` draws, in order.
KINDS = ("curves", "maps", "iou", "calibration")


def _write_json(obj, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return path


def class_names(cfg) -> Optional[tuple]:
    """The embedded dataset's shape names, else None (labels are shown as numbers)."""
    return tuple(CLASSES[: cfg.data.embedded.num_classes]) if cfg.data.dataset == "embedded" else None


def iou_scores(maps) -> dict:
    """The mean IoUs (percent) of one :class:`~.maps.MapSet` with the object, and the analysed
    images' top-1.

    Returns:
        ``{"cam/<tag>", "similar/<pair>", "discrepant/<pair>", "whole image", "top1/<tag>"}``;
        empty without masks. ``whole image`` is the IoU of the whole image with the object (its
        area share): what a region that ignores the object scores at most by covering all.
    """
    if maps.masks is None:
        return {}
    size, mask = maps.image_size, maps.masks
    scores = {}
    for tag, cam in maps.cams.items():
        if cam is not None:
            scores[f"cam/{tag}"] = mean_iou(iou(cam_region(cam, size), mask))
    for pair in maps.pairs:
        similar, discrepant = similarity_regions(pair.sim, size)
        scores[f"similar/{pair.name}"] = mean_iou(iou(similar, mask))
        scores[f"discrepant/{pair.name}"] = mean_iou(iou(discrepant, mask))
    scores["whole image"] = mean_iou(iou(torch.ones_like(mask, dtype=torch.bool), mask))
    for tag, logits in maps.logits.items():
        scores[f"top1/{tag}"] = 100.0 * float((logits.argmax(1) == maps.labels).float().mean())
    return scores


def plot_iou(result: dict, path: os.PathLike | str, title: str = "") -> Path:
    """The IoUs of ``iou.json`` against epochs: CAMs solid, similar regions dashed, discrepant
    regions dotted, the whole-image reference grey."""
    from .figures import pyplot, save

    plt = pyplot()
    rows = result["epochs"]
    xs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    keys = [k for k in rows[0] if "/" in k and k.split("/", 1)[0] in ("cam", "foreground", "similar", "discrepant")
            ] if rows else []
    styles = {"cam": "-", "foreground": "-", "similar": "--", "discrepant": ":"}
    for key in keys:
        kind, who = key.split("/", 1)
        label = {"cam": f"CAM of {who}", "foreground": f"predicted foreground of {who}",
                 "similar": f"similar region {who}", "discrepant": f"discrepant region {who}"}[kind]
        ax.plot(xs, [r[key] for r in rows], styles[kind], marker="o", ms=4, label=label)
    if rows:
        ax.plot(xs, [r["whole image"] for r in rows], color="gray", lw=1, marker="s", ms=3,
                label="whole image (reference)")
    values = [r[k] for r in rows for k in [*keys, "whole image"] if r.get(k) == r.get(k)]  # NaN left out
    ax.set(xlabel="epoch", ylabel="IoU with the object (%)", ylim=(0, min(100, 1.25 * max(values, default=80) + 5)),
           title=title or f"foreground IoU on {result.get('images', '?')} validation images")
    if len(xs) <= 12:
        ax.set_xticks(xs)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, path)


def iou_over_epochs(run_dir: os.PathLike | str, device: str = "auto", images: int = 500) -> dict:
    """IoU of the maps with the object for each kept checkpoint of a run (or the last one).

    Args:
        run_dir: the run directory.
        device: analysis device (``train.device`` values).
        images: the first validation images analysed.

    Returns:
        ``{"images", "checkpoints", "thresholds", "mappings", "epochs": [{"epoch", <iou_scores>}]}``;
        ``epochs`` is empty when the data has no masks (``"note"`` says so).
    """
    run_dir = Path(run_dir)
    kept = epoch_checkpoints(run_dir)
    paths = [p for _, p in kept] or [run_dir / "checkpoint.pt"]
    result = {"images": images, "checkpoints": "per epoch" if kept else "last only", "epochs": [],
              "thresholds": {"cam": f"min-max scaled CAM >= {CAM_THRESHOLD}",
                             "similar": "S >= its per-image mean (A_co >= 1)",
                             "discrepant": "S < its per-image mean (A_di > 1)"}}
    data = None
    for path in paths:
        loaded = load_checkpoint(path, device)
        if data is None:
            data = validation_data(loaded.cfg, loaded.precision, limit=images)
            if not data.has_masks:
                result["note"] = "the validation data has no foreground masks: no IoU"
                return result
        maps = compute_maps(loaded, data, keep_pixels=0)
        result["mappings"] = {p.name: p.mapping for p in maps.pairs}
        result["images"] = int(maps.labels.shape[0])
        result["epochs"].append({"epoch": loaded.epoch, **iou_scores(maps)})
    return result


@torch.no_grad()
def calibration_of(loaded, data, bins: int = ECE_BINS) -> dict:
    """Reliability and ECE of every model and the ensemble (mean of the probabilities).

    Returns:
        ``{tag: reliability(...)}`` with ``"ensemble"`` last.
    """
    names = list(loaded.tags) + ["ensemble"]
    sums = {name: torch.zeros(bins, 3, dtype=torch.float64, device=loaded.precision.device) for name in names}
    for images, labels, _ in data.batches():
        with loaded.precision.autocast():
            probs = [F.softmax(m(images).logits.float(), dim=1) for m in loaded.models]
        probs.append(torch.stack(probs).mean(0))
        for name, p in zip(names, probs):
            sums[name] += calibration_bins(p, labels, bins)
    return {name: reliability(s) for name, s in sums.items()}


def analyze_run(run_dir: os.PathLike | str, kinds: Optional[Iterable[str]] = None, device: str = "auto",
                images: int = 6, iou_images: int = 500, curves_path: Optional[os.PathLike | str] = None,
                log=None) -> dict:
    """Draw a run's pictures into its directory.

    Args:
        run_dir: the run directory.
        kinds: any of :data:`KINDS` (None: all of them, or the curves alone when the run has no
            checkpoint).
        device: the analysis device (``auto``: CUDA when available).
        images: rows of ``maps.png``.
        iou_images: validation images of the IoU analysis.
        curves_path: where the curves go (default: ``RUN_DIR/curves.png``).
        log: ``log(text)`` for progress lines (default: silent).

    Returns:
        ``{"files": {kind: [paths]}, "notes": [...], "iou": iou.json's dict, "calibration": {...},
        "mappings": {...}, "seconds": {kind: s}, "checkpoint": {"epoch", "kdengine_version",
        "device"}}`` for what was drawn.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` (curves) or ``checkpoint.pt`` (the rest).
    """
    from .curves import plot_run

    run_dir = Path(run_dir)
    out = {"files": {}, "notes": [], "seconds": {}}
    last = run_dir / "checkpoint.pt"
    if kinds is None:
        kinds = KINDS if last.is_file() else ("curves",)
        if not last.is_file():
            out["notes"].append("no checkpoint.pt: curves only")
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    say = log or (lambda text: None)
    if "curves" in kinds:
        start = time.perf_counter()
        out["files"]["curves"] = [plot_run(run_dir, curves_path)]
        out["seconds"]["curves"] = time.perf_counter() - start
    if not set(kinds) - {"curves"}:
        return out
    if not last.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint.pt: maps, IoU and calibration need the models")
    loaded = load_checkpoint(last, device)
    out["checkpoint"] = {"epoch": loaded.epoch, "kdengine_version": loaded.kdengine_version,
                         "device": str(loaded.precision.device)}
    title = f"{run_dir.name} ({loaded.cfg.method.name}, after epoch {loaded.epoch})"
    if loaded.cfg.data.task == "segmentation":
        return _analyze_segmentation(run_dir, loaded, kinds, device, images, iou_images, title, out, say)
    names = class_names(loaded.cfg)
    if "maps" in kinds:
        start = time.perf_counter()
        say("maps ...")
        data = validation_data(loaded.cfg, loaded.precision, limit=max(iou_images, images))
        maps = compute_maps(loaded, data, keep_pixels=images)
        out["notes"] += maps.notes
        out["mappings"] = {p.name: p.mapping for p in maps.pairs}
        out["files"]["maps"] = [plot_maps(maps, run_dir / "maps.png", images, names, title)]
        out["seconds"]["maps"] = time.perf_counter() - start
    if "iou" in kinds:
        start = time.perf_counter()
        say("foreground IoU ...")
        _record_iou(run_dir, iou_over_epochs(run_dir, device, iou_images), out, start)
    if "calibration" in kinds:
        start = time.perf_counter()
        say("calibration ...")
        data = validation_data(loaded.cfg, loaded.precision)
        diagrams = calibration_of(loaded, data)
        out["calibration"] = diagrams
        out["files"]["calibration"] = [
            _write_json({"epoch": loaded.epoch, "bins": ECE_BINS, "models": diagrams}, run_dir / "calibration.json"),
            plot_reliability(diagrams, run_dir / "calibration.png", title=title)]
        out["seconds"]["calibration"] = time.perf_counter() - start
    return out


def _record_iou(run_dir: Path, result: dict, out: dict, start: float) -> None:
    """``iou.json`` and, when there are epochs, ``iou.png`` of an IoU analysis, into ``out``."""
    out["iou"] = result
    files = [_write_json(result, run_dir / "iou.json")]
    if result["epochs"]:
        files.append(plot_iou(result, run_dir / "iou.png", title=f"{run_dir.name}: IoU with the object "
                                                                 f"({result['images']} validation images)"))
    else:
        out["notes"].append(result.get("note", "no IoU"))
    if result["checkpoints"] == "last only":
        out["notes"].append("IoU for the last checkpoint only: train with train.keep_checkpoints=true to keep "
                            "one per epoch")
    out["files"]["iou"] = files
    out["seconds"]["iou"] = time.perf_counter() - start


def _analyze_segmentation(run_dir: Path, loaded, kinds, device: str, images: int, iou_images: int, title: str,
                          out: dict, say) -> dict:
    """:func:`analyze_run`'s maps and IoU of a segmentation run (:mod:`~.segmaps`); no calibration
    (per-pixel reliability is not drawn)."""
    background = 0 if loaded.cfg.data.dataset == "embedded" else None  # Cityscapes has no background class
    num_classes = num_classes_of(loaded.cfg)
    if "maps" in kinds:
        start = time.perf_counter()
        say("maps ...")
        data = validation_data(loaded.cfg, loaded.precision, limit=images)
        maps = compute_segmentation_maps(loaded, data, keep_pixels=images, background=background)
        out["notes"] += maps.notes
        out["mappings"] = {p.name: p.mapping for p in maps.pairs}
        out["files"]["maps"] = [plot_segmentation_maps(maps, run_dir / "maps.png", num_classes, images, title)]
        out["seconds"]["maps"] = time.perf_counter() - start
    if "iou" in kinds:
        start = time.perf_counter()
        say("object IoU ...")
        _record_iou(run_dir, segmentation_iou_over_epochs(run_dir, device, iou_images, background), out, start)
    if "calibration" in kinds:
        out["notes"].append("calibration: drawn for classification runs only")
    return out


def segmentation_iou_over_epochs(run_dir: os.PathLike | str, device: str = "auto", images: int = 500,
                                 background: Optional[int] = 0) -> dict:
    """:func:`~.segmaps.object_iou_scores` for each kept checkpoint of a segmentation run (or the
    last one): the ADM paper's Fig. 2 question for dense prediction.

    Returns:
        As :func:`iou_over_epochs`; ``epochs`` is empty without a background class.
    """
    run_dir = Path(run_dir)
    kept = epoch_checkpoints(run_dir)
    paths = [p for _, p in kept] or [run_dir / "checkpoint.pt"]
    result = {"images": images, "checkpoints": "per epoch" if kept else "last only", "epochs": [],
              "thresholds": {"similar": "S >= its per-image mean (A_co >= 1)",
                             "discrepant": "S < its per-image mean (A_di > 1)",
                             "foreground": "pixels predicted as any class but the background"}}
    if background is None:
        result["note"] = "the data has no background class: no object IoU"
        return result
    data = None
    for path in paths:
        loaded = load_checkpoint(path, device)
        if data is None:
            data = validation_data(loaded.cfg, loaded.precision, limit=images)
        maps = compute_segmentation_maps(loaded, data, keep_pixels=0, background=background)
        result["mappings"] = {p.name: p.mapping for p in maps.pairs}
        result["images"] = int(maps.labels.shape[0])
        result["epochs"].append({"epoch": loaded.epoch, **object_iou_scores(maps, background)})
    return result
