"""Metrics: on-device accumulation inside the step (no host syncs), and the run's records —
JSON lines, CSV and TensorBoard — written from the host once per log interval or epoch."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..losses.segmentation import labels_at

#: The validation metric that ranks a task's models (a run's "best", the sweep tables), in percent.
PRIMARY_METRICS = {"classification": "top1", "segmentation": "miou"}
#: Training metrics the step reports as fractions (the records show them in percent).
ACCURACY_METRICS = ("top1", "pixel_accuracy")


def primary_metric(record: dict) -> str:
    """The primary metric of a validation record (:data:`PRIMARY_METRICS`): ``"miou"`` where the
    record has ``<tag>/miou`` keys (a segmentation run), else ``"top1"``."""
    return "miou" if any(k.endswith("/miou") for k in record) else "top1"


def metric_tags(record: dict, metric: str) -> list[str]:
    """The model tags of a record that carry ``<tag>/<metric>``, in the record's order."""
    suffix = "/" + metric
    return [k[: -len(suffix)] for k in record if k.endswith(suffix)]


class DeviceMeter:
    """Running sums of named scalars kept on the device; ``read`` syncs once for all of them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, values: dict[str, torch.Tensor], weight: int = 1) -> None:
        for name, value in values.items():
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros((), dtype=torch.float64, device=self.device)
            acc.add_(value.detach().to(torch.float64), alpha=weight)
        self.count.add_(weight)

    def read(self) -> dict[str, float]:
        """Means since the last reset (one device-to-host copy)."""
        if not self.sums:
            return {}
        names = list(self.sums)
        values = (torch.stack([self.sums[n] for n in names]) / self.count.clamp_min(1)).tolist()
        return dict(zip(names, values))

    def reset(self) -> None:
        self.sums.clear()
        self.count.zero_()


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (on the device)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return [hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def pixel_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """The fraction of labelled pixels whose class is the argmax of the logits, at the logits'
    grid (labels nearest-downsampled to it, :func:`kdengine.losses.segmentation.labels_at`);
    on the device, no host sync.

    Args:
        logits: ``[B, K, h, w]``.
        labels: ``[B, H, W]`` class ids, ``ignore_index`` where unlabelled.
        ignore_index: the label of pixels without a class.

    Returns:
        A 0-d float tensor (0 when no pixel is labelled).
    """
    target = labels_at(labels, logits.shape[-2:])
    valid = target != ignore_index
    hits = ((logits.argmax(1) == target) & valid).sum()
    return hits.float() / valid.sum().clamp_min(1).float()


class RunLog:
    """``metrics.jsonl`` (one record per epoch and split), ``metrics.csv`` (the same, flat) and
    TensorBoard event files, all under the run directory. Appends, so a resumed run continues
    the same files (records at or after the resume point are dropped first)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def records(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Keep only the records of epochs before ``epoch`` (a resume restarts that epoch)."""
        if not self.enabled:
            return
        kept = [r for r in self.records() if r["epoch"] < epoch]
        self._rewrite(kept)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.jsonl)
        self._write_csv(records)

    def _write_csv(self, records: list[dict]) -> None:
        columns: list[str] = []
        for r in records:
            columns += [k for k in r if k not in columns]
        tmp = self.csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
        os.replace(tmp, self.csv)

    def write(self, record: dict, step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv(self.records())  # rewritten whole: columns may grow
        if self._tb is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step if step is not None else record["epoch"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


@torch.no_grad()
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """The ``[K, K]`` pixel counts (rows: true class, columns: predicted) of a batch of label maps.

    Args:
        pred: predicted classes, ``[B, H, W]`` integers in ``0 .. K-1``.
        target: true classes, ``[B, H, W]``; pixels equal to ``ignore_index`` are not counted.
        num_classes: K.
        ignore_index: the label of pixels without a class.

    Returns:
        int64 ``[K, K]`` on the inputs' device.

    Raises:
        ValueError: ``pred`` and ``target`` of different shapes, or a label outside ``0 .. K-1``
            that is not ``ignore_index``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    valid = target != ignore_index
    codes = target[valid].long() * num_classes + pred[valid].long()
    counts = torch.bincount(codes, minlength=num_classes * num_classes)
    if counts.numel() > num_classes * num_classes:  # bincount grew past K*K: a label >= K
        raise ValueError(f"confusion_matrix: target has labels >= num_classes={num_classes} other than "
                         f"ignore_index={ignore_index}")
    return counts.view(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict:
    """mIoU and pixel accuracy of a confusion matrix (:func:`confusion_matrix`, summed).

    IoU of class k = TP / (TP + FP + FN); a class absent from both the labels and the predictions
    has no IoU (NaN) and is left out of the mean, as Cityscapes' and mmseg's evaluations do.

    Args:
        confusion: ``[K, K]`` counts.

    Returns:
        ``{"miou", "pixel_accuracy"}`` in percent and ``"iou"``: the per-class IoU list (percent,
        NaN where undefined).
    """
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    return {"miou": 100 * float(iou.nanmean()) if bool((union > 0).any()) else float("nan"),
            "pixel_accuracy": 100 * float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": (100 * iou).tolist()}
