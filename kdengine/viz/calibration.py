"""Calibration: expected calibration error (ECE) and reliability diagrams (ADM paper Fig. 5, 10).

A prediction's confidence is its top probability. Confidences fall into ``bins`` equal-width bins
(bin k holds [k/bins, (k+1)/bins); a confidence of exactly 1 goes to the last bin). Per bin the
sums of samples, confidences and correct predictions are additive, so they are accumulated over
batches (and summed over processes) before the ECE is read from them:

    ECE = sum_k |B_k| / N * |acc(B_k) - conf(B_k)| = sum_k |correct_k - confidence_k| / N

(Guo et al., 2017, "On Calibration of Modern Neural Networks"), reported in percent like the
accuracies.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from ..methods.base import at_least_fp32

#: The bins of every ECE kdengine reports (Guo et al. use 15).
ECE_BINS = 15


@torch.no_grad()
def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Per-bin sums of one batch, to be added up over batches.

    Args:
        probs: predicted probabilities ``[B, C]`` (rows sum to 1).
        labels: the true classes ``[B]``.
        bins: equal-width confidence bins over [0, 1].

    Returns:
        ``[bins, 3]`` float64 on the probabilities' device: per bin the number of samples, the sum
        of their confidences and the number of correct predictions.
    """
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be [B, C] and labels [B], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    confidence, predicted = at_least_fp32(probs).max(dim=1)
    index = (confidence * bins).long().clamp_(0, bins - 1)
    values = torch.stack([torch.ones_like(confidence), confidence, predicted.eq(labels).float()], dim=1)
    sums = torch.zeros(bins, 3, dtype=torch.float64, device=probs.device)
    return sums.index_add_(0, index, values.double())


def ece_from_bins(sums: torch.Tensor) -> float:
    """The expected calibration error, in percent, of accumulated :func:`calibration_bins` sums.

    Args:
        sums: ``[bins, 3]``: samples, confidence sum, correct count per bin.

    Returns:
        ECE in percent (0 for no samples).
    """
    sums = sums.double().cpu()
    total = float(sums[:, 0].sum())
    if total == 0:
        return 0.0
    return 100.0 * float((sums[:, 2] - sums[:, 1]).abs().sum()) / total


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent of probabilities ``[B, C]`` against labels ``[B]`` (see the module docstring)."""
    return ece_from_bins(calibration_bins(probs, labels, bins))


def reliability(sums: torch.Tensor) -> dict:
    """What a reliability diagram shows, from accumulated bin sums.

    Args:
        sums: ``[bins, 3]`` from :func:`calibration_bins`.

    Returns:
        ``{"ece", "count", "accuracy", "confidence", "edges"}``: ECE in percent, per bin the
        number of samples, the accuracy and the mean confidence (both in [0, 1]; NaN in empty
        bins), and the ``bins + 1`` bin edges.
    """
    sums = sums.double().cpu()
    bins = sums.shape[0]
    count = sums[:, 0]
    safe = count.clamp_min(1)
    empty = count == 0
    accuracy = torch.where(empty, torch.nan, sums[:, 2] / safe)
    confidence = torch.where(empty, torch.nan, sums[:, 1] / safe)
    return {"ece": ece_from_bins(sums), "count": count.tolist(), "accuracy": accuracy.tolist(),
            "confidence": confidence.tolist(), "edges": [k / bins for k in range(bins + 1)]}


def plot_reliability(diagrams: Mapping[str, dict], path: os.PathLike | str, title: str = "") -> Path:
    """Reliability diagrams side by side, one per model: accuracy per confidence bin against
    the diagonal of perfect calibration, the gap to each bin's mean confidence shaded, and the
    share of samples per bin underneath.

    Args:
        diagrams: ``{name: reliability(...)}``, in display order.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        ``path``.
    """
    from .figures import pyplot, save

    plt = pyplot()
    n = max(1, len(diagrams))
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 4.4), squeeze=False, constrained_layout=True,
                             gridspec_kw={"height_ratios": [3, 1]})
    for col, (name, d) in enumerate(diagrams.items()):
        ax, hist = axes[0, col], axes[1, col]
        edges = d["edges"]
        width = edges[1] - edges[0]
        left = edges[:-1]
        acc = [0.0 if a != a else a for a in d["accuracy"]]  # NaN (empty bin): no bar
        conf = [c if c == c else left[k] + width / 2 for k, c in enumerate(d["confidence"])]
        ax.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="black", lw=0.5, label="accuracy")
        ax.bar(left, [c - a if n_k else 0.0 for c, a, n_k in zip(conf, acc, d["count"])], bottom=acc, width=width,
               align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red", lw=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{name}: ECE {d['ece']:.2f}%", ylabel="accuracy" if col == 0 else "")
        if col == 0:
            ax.legend(loc="upper left", fontsize="small")
        total = max(sum(d["count"]), 1)
        hist.bar(left, [c / total for c in d["count"]], width=width, align="edge", color="gray")
        hist.set(xlim=(0, 1), xlabel="confidence", ylabel="share" if col == 0 else "")
    if title:
        fig.suptitle(title)
    return save(fig, path)
