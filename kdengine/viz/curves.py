"""Accuracy and loss curves of a run, from its ``metrics.jsonl``, as a PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..engine.metrics import metric_tags, primary_metric
from .figures import pyplot, save


def _series(records: list[dict], split: str, suffix: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in records:
        if r.get("split") != split:
            continue
        for key, value in r.items():
            if key.endswith(suffix):
                xs, ys = out.setdefault(key[: -len(suffix)], ([], []))
                xs.append(r["epoch"] + 1)
                ys.append(value)
    return out


def _models(records: list[dict], metric: str) -> list[str]:
    """The models' tags in the order the records name them, the ensemble last."""
    names: list[str] = []
    for r in records:
        if r.get("split") == "val":
            names += [t for t in metric_tags(r, metric) if t not in names]
    return [n for n in names if n != "ensemble"] + (["ensemble"] if "ensemble" in names else [])


def plot_curves(records: list[dict], path: os.PathLike | str, title: str = "") -> Path:
    """Three panels against the (1-based) epochs: every model's and the ensemble's validation
    top-1 (mIoU for segmentation), their validation cross-entropy, and the training loss (the method's total, on its own
    axis: its scale is not a cross-entropy's). A model has one colour in every panel, and every
    point a marker, so a run of one epoch shows its values.

    Args:
        records: the run's ``metrics.jsonl`` records.
        path: the PNG to write.
        title: the figure's title (e.g. the run's name).

    Returns:
        ``path`` as a ``Path``.
    """
    from matplotlib.ticker import FixedLocator, MaxNLocator

    plt = pyplot()
    val = [r for r in records if r.get("split") == "val"]
    metric = primary_metric(val[-1]) if val else "top1"  # top-1, or mIoU for segmentation
    names = _models(records, metric)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {name: cycle[i % len(cycle)] for i, name in enumerate(names)}
    style = {name: dict(color=colour[name], marker="o", ms=4, linestyle="--" if name == "ensemble" else "-")
             for name in names}

    epochs = max((r["epoch"] + 1 for r in records if "epoch" in r), default=1)
    # One epoch: single points, spread sideways so that equal values stay apart, each labelled.
    spread = {name: 0.2 * (i - (len(names) - 1) / 2) for i, name in enumerate(names)} if epochs == 1 else {}

    fig, (acc_ax, ce_ax, loss_ax) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    accuracy = ("/top1", "top-1 (%)", "validation accuracy") if metric == "top1" else \
        ("/miou", "mIoU (%)", "validation mIoU")
    for ax, suffix, label, heading in ((acc_ax, *accuracy),
                                       (ce_ax, "/loss", "cross-entropy", "validation cross-entropy")):
        series = _series(records, "val", suffix)
        for name in names:
            if name in series:
                xs, ys = series[name]
                xs = [x + spread.get(name, 0.0) for x in xs]
                ax.plot(xs, ys, label=name, **style[name])
                if spread:
                    ax.annotate(f"{ys[0]:.2f}", (xs[0], ys[0]), xytext=(0, 6), textcoords="offset points",
                                ha="center", fontsize="small", color=colour[name])
                    ax.margins(y=0.15)
        ax.set(xlabel="epoch", ylabel=label, title=heading)
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    loss_ax.plot([r["epoch"] + 1 for r in train], [r["loss"] for r in train], color="black", marker="o", ms=4,
                 label="total (all models and terms)")
    if spread and train:
        loss_ax.annotate(f"{train[0]['loss']:.3f}", (1, train[0]["loss"]), xytext=(0, 6), textcoords="offset points",
                         ha="center", fontsize="small")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss (epoch mean)")
    for ax in (acc_ax, ce_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.set_xlim(0.5, epochs + 0.5)
        ax.xaxis.set_major_locator(FixedLocator(range(1, epochs + 1)) if epochs <= 12 else MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def plot_run(run_dir: os.PathLike | str, output: os.PathLike | str | None = None) -> Path:
    """``curves.png`` (or ``output``) of the run in ``run_dir``."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a kdengine run directory?)")
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return plot_curves(records, output or run_dir / "curves.png", title=run_dir.name)
