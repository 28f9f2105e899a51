"""Accuracy and loss curves of a run, from its ``metrics.jsonl``, as a PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path


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


def plot_curves(records: list[dict], path: os.PathLike | str, title: str = "") -> Path:
    """Two panels: validation top-1 of every model and the ensemble, and the training loss."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, (xs, ys) in sorted(_series(records, "val", "/top1").items()):
        acc_ax.plot(xs, ys, marker="o", ms=3, label=name, linestyle="--" if name == "ensemble" else "-")
    acc_ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation accuracy")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend()
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    if train:
        loss_ax.plot([r["epoch"] + 1 for r in train], [r["loss"] for r in train], marker="o", ms=3, label="total")
    for name, (xs, ys) in sorted(_series(records, "val", "/loss").items()):
        loss_ax.plot(xs, ys, linestyle=":", label=f"{name} (val CE)")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="losses")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_run(run_dir: os.PathLike | str, output: os.PathLike | str | None = None) -> Path:
    """``curves.png`` (or ``output``) of the run in ``run_dir``."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a kdengine run directory?)")
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return plot_curves(records, output or run_dir / "curves.png", title=run_dir.name)
