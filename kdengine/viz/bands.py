"""Several runs in one plot: runs that differ only in the seed form one group, drawn as the mean
over its seeds with a band of one standard deviation (sample std; none for a single run).

Groups come from the runs' resolved configurations
(:func:`kdengine.engine.config.config_differences`): the settings whose values differ between the
runs, less the seed and the settings that only name or place a run, label the groups.
"""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from omegaconf import OmegaConf

from ..engine.config import config_differences
from ..engine.metrics import metric_tags, primary_metric
from .runs import read_records, run_config

#: Settings that name or place a run, never part of what it computes.
RUN_IDENTITY = ("train.run_name", "train.output_dir", "train.resume")


def group_runs(configs: Mapping[str, dict], seed_key: str = "train.seed") -> dict[str, list[str]]:
    """Runs grouped by everything but the seed.

    Args:
        configs: ``{run name: its configuration}`` (plain dicts or DictConfigs).
        seed_key: the setting whose runs are averaged.

    Returns:
        ``{label: [run names]}`` in first-seen order; the label lists the settings that differ
        between the runs as ``key=value`` (``"all runs"`` when only seeds and run names differ).
    """
    names = list(configs)
    if not names:
        return {}
    skip = {seed_key, *RUN_IDENTITY}
    base = configs[names[0]]
    diffs = {n: {k: (a, b) for k, a, b in config_differences(base, configs[n]) if k not in skip} for n in names}
    keys = sorted({k for d in diffs.values() for k in d})
    base_values = {k: next(d[k][0] for d in diffs.values() if k in d) for k in keys}
    groups: dict[str, list[str]] = {}
    for name in names:
        label = ", ".join(f"{k}={diffs[name][k][1] if k in diffs[name] else base_values[k]}" for k in keys)
        groups.setdefault(label or "all runs", []).append(name)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for fewer than two values)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _val_series(records: list[dict], key: str) -> dict[int, float]:
    return {r["epoch"] + 1: r[key] for r in records if r.get("split") == "val" and key in r}


def plot_runs(run_dirs: Sequence[os.PathLike | str], path: os.PathLike | str, seed_key: str = "train.seed",
              title: str = "") -> Path:
    """Validation top-1 (top row) and loss (bottom row) of every model (one column each, the
    ensemble last) against epochs, one line per group of seeds with its band.

    Args:
        run_dirs: run directories (each with ``config.yaml`` and ``metrics.jsonl``).
        path: the PNG to write.
        seed_key: the setting whose runs are averaged.
        title: the figure's title.

    Returns:
        ``path``.
    """
    from .figures import pyplot, save

    plt = pyplot()
    configs, records = {}, {}
    for run in map(Path, run_dirs):
        cfg = run_config(run)
        configs[str(run)] = OmegaConf.to_container(cfg) if cfg is not None else {}
        records[str(run)] = read_records(run)
    groups = group_runs(configs, seed_key)
    tags, metric = [], "top1"
    for recs in records.values():
        for r in recs:
            if r.get("split") == "val":
                metric = primary_metric(r)
                tags += [t for t in metric_tags(r, metric) if t not in tags]
    tags = sorted(tags, key=lambda t: (t == "ensemble", tags.index(t)))
    fig, axes = plt.subplots(2, max(len(tags), 1), figsize=(4 * max(len(tags), 1), 6.5), squeeze=False,
                             constrained_layout=True, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, (label, names) in enumerate(groups.items()):
        colour = colours[g % len(colours)]
        for col, tag in enumerate(tags):
            for row, key in enumerate((metric, "loss")):
                series = [_val_series(records[n], f"{tag}/{key}") for n in names]
                epochs = sorted({e for s in series for e in s})
                stats = [mean_std([s[e] for s in series if e in s]) for e in epochs]
                means = [m for m, _ in stats]
                ax = axes[row, col]
                ax.plot(epochs, means, color=colour, marker="o", ms=3,
                        label=f"{label} (n={len(names)})" if col == 0 and row == 0 else None)
                if len(names) > 1:
                    low = [m - (s if s == s else 0.0) for m, s in stats]
                    high = [m + (s if s == s else 0.0) for m, s in stats]
                    ax.fill_between(epochs, low, high, color=colour, alpha=0.2, lw=0)
    from matplotlib.ticker import MaxNLocator

    for col, tag in enumerate(tags):
        axes[1, col].xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        axes[0, col].set(title=tag, ylabel=f"val {'mIoU' if metric == 'miou' else 'top-1'} (%)" if col == 0 else "")
        axes[1, col].set(xlabel="epoch", ylabel="val loss (CE)" if col == 0 else "")
        for row in range(2):
            axes[row, col].grid(alpha=0.3)
    if groups:
        axes[0, 0].legend(fontsize="small")
    fig.suptitle(title or "mean over seeds, band: one standard deviation")
    return save(fig, path)
