"""The paper-style table of a sweep: one row per setting (every planned combination but the seed),
every model's validation top-1 (mIoU for segmentation runs) at the last epoch and at its best
epoch as mean ± sample standard deviation over the seeds, ``n`` the finished runs in the mean.

Only finished runs enter the means; failed, unfinished and missing runs are counted in each row's
``runs`` cell and listed by name under the table, so a mean over fewer seeds is never silent.
Written as Markdown (``table.md``), CSV (``table.csv``, one line per row and model) and per run
(``runs.csv``) into the sweep folder.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..engine.metrics import metric_tags, primary_metric
from ..viz.bands import mean_std
from .plan import load_plan
from .status import read_records, run_state

STATUSES = ("completed", "failed", "unfinished", "missing")
#: How the tables name each primary metric (:data:`kdengine.engine.metrics.PRIMARY_METRICS`).
METRIC_LABELS = {"top1": "top-1", "miou": "mIoU"}


@dataclass
class RunResult:
    """One planned run as its directory stands."""

    name: str
    values: dict
    status: str
    epochs_done: int
    epochs: Optional[int]
    last: dict  # tag -> top-1 (mIoU) of the last validation
    best: dict  # tag -> best top-1 (mIoU) over the validations
    error: Optional[str]
    wall_s: Optional[float]
    metric: str = "top1"  # the records' primary metric


@dataclass
class Row:
    """The runs of one setting, and per model the statistics of the finished ones."""

    values: dict
    runs: list
    stats: dict = field(default_factory=dict)  # tag -> {"last": (mean, std), "best": (mean, std)}

    @property
    def n(self) -> int:
        return sum(r.status == "completed" for r in self.runs)

    def counts(self) -> dict:
        return {s: sum(r.status == s for r in self.runs) for s in STATUSES}

    def runs_cell(self) -> str:
        counts = self.counts()
        rest = ", ".join(f"{counts[s]} {s}" for s in STATUSES[1:] if counts[s])
        return f"{counts['completed']}/{len(self.runs)}" + (f" ({rest})" if rest else "")


@dataclass
class SweepTable:
    sweep_dir: Path
    seed_key: str
    settings: list  # the row labels' keys
    tags: list
    rows: list
    runs: list
    metric: str = "top1"  # the primary metric of the runs' records: top1 or miou

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)


def _settings_of(run) -> dict:
    """Every setting a run trains with, ``key -> value`` as given: its invocation's shared
    overrides and its axis values (a folder's runs may come from several invocations, each with
    its own shared settings, e.g. an ablation of ``method.options.adm`` with ``method.name`` fixed)."""
    settings = {}
    for item in run.overrides:
        key, _, value = str(item).partition("=")
        settings[key.strip()] = value
    settings.update(run.values)
    return settings


def _result(sweep_dir: Path, run) -> RunResult:
    run_dir = sweep_dir / run.name
    state = run_state(run_dir)
    val = [r for r in read_records(run_dir) if r.get("split") == "val"]
    metric = primary_metric(val[-1]) if val else "top1"
    last, best = {}, {}
    for r in val:
        for tag in metric_tags(r, metric):
            best[tag] = max(best.get(tag, -math.inf), r[f"{tag}/{metric}"])
    if val:
        last = {tag: val[-1][f"{tag}/{metric}"] for tag in metric_tags(val[-1], metric)}
    return RunResult(run.name, _settings_of(run), state["status"], state["epochs_done"], state["epochs"], last, best,
                     state["error"], state["wall_s"], metric)


def sweep_table(sweep_dir: os.PathLike | str, seed_key: Optional[str] = None) -> SweepTable:
    """Read a sweep folder into its table.

    Args:
        sweep_dir: a folder made by ``kdengine sweep`` (with ``sweep.json``).
        seed_key: the setting averaged over (default: the plan's, ``train.seed``).

    Returns:
        The :class:`SweepTable`.
    """
    sweep_dir = Path(sweep_dir)
    plan = load_plan(sweep_dir)
    seed_key = seed_key or plan.seed_key
    results = [_result(sweep_dir, run) for run in plan.runs]
    settings = []  # the settings that tell the runs apart (the seed aside)
    for r in results:
        settings += [k for k in r.values if k != seed_key and k not in settings
                     and len({str(other.values.get(k, "")) for other in results}) > 1]
    rows: dict[tuple, Row] = {}
    for r in results:
        key = tuple(r.values.get(k, "") for k in settings)
        rows.setdefault(key, Row({k: r.values.get(k, "") for k in settings}, [])).runs.append(r)
    tags = []
    for r in results:
        tags += [t for t in r.last if t not in tags]
    tags = sorted(tags, key=lambda t: (t == "ensemble", tags.index(t)))
    for row in rows.values():
        done = [r for r in row.runs if r.status == "completed"]
        for tag in tags:
            row.stats[tag] = {which: mean_std([getattr(r, which)[tag] for r in done if tag in getattr(r, which)])
                              for which in ("last", "best")}
    metrics = {r.metric for r in results if r.last}
    if len(metrics) > 1:
        raise ValueError(f"{sweep_dir}: its runs report different metrics {sorted(metrics)} (classification and "
                         "segmentation runs in one sweep); their means would not be comparable")
    return SweepTable(sweep_dir, seed_key, settings, tags, list(rows.values()), results,
                      metrics.pop() if metrics else "top1")


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def header(table: SweepTable) -> list[str]:
    cols = list(table.settings) or ["setting"]
    cols.append("n")
    for tag in table.tags:
        cols += [f"{tag} {table.metric_label} (last)", f"{tag} {table.metric_label} (best)"]
    return cols + ["runs"]


def cells(table: SweepTable) -> list[list[str]]:
    """The table's rows as display strings (the columns of :func:`header`)."""
    out = []
    for row in table.rows:
        line = [str(row.values[k]) for k in table.settings] or ["all runs"]
        line.append(str(row.n))
        for tag in table.tags:
            line += [_pm(*row.stats[tag]["last"]), _pm(*row.stats[tag]["best"])]
        out.append(line + [row.runs_cell()])
    return out


def not_averaged(table: SweepTable) -> list[str]:
    """One line per run left out of the means: its name, status and why."""
    lines = []
    for r in table.runs:
        if r.status == "completed":
            continue
        what = {"failed": f"failed{': ' + r.error if r.error else ''}",
                "unfinished": f"unfinished after {r.epochs_done}/{r.epochs or '?'} epochs",
                "missing": "missing (not started)"}[r.status]
        lines.append(f"{r.name}: {what}")
    return lines


def to_markdown(table: SweepTable) -> str:
    cols = header(table)
    lines = [f"Validation {table.metric_label} (%) over `{table.seed_key}`: mean ± sample standard deviation of "
             "the finished runs (n), at the last epoch and at each run's best epoch.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells(table)]
    missing = not_averaged(table)
    if missing:
        lines += ["", "Not in the means:", ""] + [f"- {m}" for m in missing]
    return "\n".join(lines) + "\n"


def to_csv(table: SweepTable) -> str:
    """One line per (row, model): the settings, n, the means and standard deviations, the counts."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    m = table.metric
    writer.writerow([*table.settings, "model", "n", f"{m}_last_mean", f"{m}_last_std", f"{m}_best_mean",
                     f"{m}_best_std", "planned", *STATUSES])
    for row in table.rows:
        counts = row.counts()
        for tag in table.tags:
            (lm, ls), (bm, bs) = row.stats[tag]["last"], row.stats[tag]["best"]
            writer.writerow([*(row.values[k] for k in table.settings), tag, row.n, *(_num(v) for v in (lm, ls, bm, bs)),
                             len(row.runs), *(counts[s] for s in STATUSES)])
    return buf.getvalue()


def runs_csv(table: SweepTable) -> str:
    """One line per planned run: its values, status, epochs, every model's last and best top-1 (mIoU)."""
    keys = list(table.settings) + ([table.seed_key] if any(table.seed_key in r.values for r in table.runs) else [])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["run", *keys, "status", "epochs_done", "epochs",
                     *(f"{t}_{table.metric}" for t in table.tags), *(f"{t}_best_{table.metric}" for t in table.tags),
                     "wall_s", "error"])
    for r in table.runs:
        writer.writerow([r.name, *(r.values.get(k, "") for k in keys), r.status, r.epochs_done, r.epochs or "",
                         *(_num(r.last.get(t)) for t in table.tags), *(_num(r.best.get(t)) for t in table.tags),
                         r.wall_s if r.wall_s is not None else "", r.error or ""])
    return buf.getvalue()


def _num(value) -> str:
    """A number for CSV: up to 4 decimals, no trailing zeros; empty for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def write_tables(sweep_dir: os.PathLike | str, seed_key: Optional[str] = None) -> tuple[SweepTable, list[Path]]:
    """``table.md``, ``table.csv`` and ``runs.csv`` into the sweep folder.

    Returns:
        ``(table, [paths])``.
    """
    table = sweep_table(sweep_dir, seed_key)
    paths = []
    for name, text in (("table.md", to_markdown(table)), ("table.csv", to_csv(table)), ("runs.csv", runs_csv(table))):
        path = table.sweep_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    return table, paths
