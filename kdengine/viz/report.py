"""The run report (`kdengine viz report`): one self-contained HTML page — images embedded as data
URIs, no script, no network — for run directories and sweep folders.

A run's section: the final table (every model's and the ensemble's last and best top-1, top-5
and ECE), the curves, the maps, the foreground IoU over the epochs, the reliability diagrams, the
notes of the analysis, the resolved configuration, versions and timings. A sweep's section: its
mean ± std table (failed and missing runs shown) and its runs' curves with seeds as bands.
Several runs: a comparison plot first.
"""
from __future__ import annotations

import base64
import html
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..engine.metrics import metric_tags, primary_metric
from ..engine.setup import model_tags
from .analysis import analyze_run
from .bands import plot_runs
from .runs import read_records, run_config

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; display: block; margin: .5em 0; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }
.note { color: #7a5200; } .muted { color: #666; font-size: .9em; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _img(path: os.PathLike | str, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _final_table(run_dir: Path, records: list[dict], calibration: Optional[dict]) -> str:
    val = [r for r in records if r.get("split") == "val"]
    if not val:
        return '<p class="note">No validation record yet.</p>'
    cfg = run_config(run_dir)
    archs = dict(zip(model_tags(cfg), (m.name for m in cfg.models))) if cfg is not None else {}
    archs["ensemble"] = "mean of the probabilities"
    last = val[-1]
    if primary_metric(last) == "miou":  # a segmentation run
        rows = [[tag, archs.get(tag, ""), _num(last.get(f"{tag}/miou")), _num(last.get(f"{tag}/pixel_accuracy")),
                 _num(max(r.get(f"{tag}/miou", -math.inf) for r in val)), _num(last.get(f"{tag}/loss"), 3)]
                for tag in metric_tags(last, "miou")]
        return (f'<p>After epoch {last["epoch"] + 1} ({len(val)} validations).</p>'
                + _table(["model", "architecture", "mIoU (last)", "pixel accuracy (last)", "mIoU (best)",
                          "val loss (last)"], rows, "final"))
    rows = []
    for tag in metric_tags(last, "top1"):
        arch = archs.get(tag, "")
        best = max(r.get(f"{tag}/top1", -math.inf) for r in val)
        ece = (calibration or {}).get(tag, {}).get("ece")
        rows.append([tag, arch, _num(last.get(f"{tag}/top1")), _num(last.get(f"{tag}/top5")), _num(best),
                     _num(last.get(f"{tag}/loss"), 3), _num(ece)])
    return (f'<p>After epoch {last["epoch"] + 1} ({len(val)} validations).</p>'
            + _table(["model", "architecture", "top-1 (last)", "top-5 (last)", "top-1 (best)", "val loss (last)",
                      "ECE % (last)"], rows, "final"))


def _timings(run_dir: Path, records: list[dict], seconds: dict) -> str:
    from ..sweep.status import read_status

    parts = []
    timed = [r for r in records if any(k.endswith("_s") for k in r)]
    if timed:
        keys = sorted({k for r in timed for k in r if k.endswith("_s")})
        parts.append(_table(["epoch", "split", *keys], [[r["epoch"] + 1, r.get("split", ""),
                                                         *(_num(r.get(k), 1) for k in keys)] for r in timed]))
    attempts = read_status(run_dir).get("attempts", [])
    if attempts:
        parts.append(_table(["sweep attempt", "started", "status", "wall s"],
                            [[i + 1, a.get("started") or "", a.get("status", ""), _num(a.get("wall_s"), 0)]
                             for i, a in enumerate(attempts)]))
    if not timed and not attempts:
        files = [run_dir / n for n in ("config.yaml", "metrics.jsonl") if (run_dir / n).is_file()]
        if len(files) == 2:
            span = files[1].stat().st_mtime - files[0].stat().st_mtime
            parts.append(f'<p class="muted">Last start (config.yaml written) to last record: {span:.0f} s.</p>')
    if seconds:
        parts.append(_table(["analysis", "seconds"], [[k, _num(v, 1)] for k, v in seconds.items()]))
    return "".join(parts)


def _iou_table(result: dict) -> str:
    rows = result.get("epochs", [])
    if not rows:
        return ""
    keys = [k for k in rows[0] if k != "epoch"]
    return _table(["epoch", *keys], [[r["epoch"], *(_num(r.get(k), 1) for k in keys)] for r in rows])


def run_section(run_dir: Path, device: str, images: int, iou_images: int, log) -> str:
    """The HTML of one run (its pictures are drawn into the run directory first)."""
    analysis = analyze_run(run_dir, device=device, images=images, iou_images=iou_images, log=log)
    records = read_records(run_dir)
    files = analysis["files"]
    out = [f"<h2>Run {_e(run_dir.name)}</h2>", f'<p class="muted">{_e(run_dir.resolve())}</p>']
    cfg = run_config(run_dir)
    if cfg is not None:
        models = ", ".join(f"{m.name} ({m.role})" for m in cfg.models)
        out.append(f"<p>{_e(cfg.method.name)} on {_e(models)}; data {_e(cfg.data.dataset)}; "
                   f"{cfg.train.epochs} epochs, seed {cfg.train.seed}.</p>")
    out.append("<h3>Final table</h3>" + _final_table(run_dir, records, analysis.get("calibration")))
    out.append("<h3>Curves</h3>" + _img(files["curves"][0], f"{run_dir.name}: curves"))
    if "maps" in files:
        mappings = "; ".join(f"{k}: {v}" for k, v in analysis.get("mappings", {}).items())
        out.append("<h3>Maps</h3><p>Per image: S between the pair's last-stage features (-1 blue .. 1 red), ADM's "
                   "consensus A_co and divergence A_di, each model's CAM for its predicted class; the object's "
                   f"outline in white. Student-to-teacher channels: {_e(mappings or 'n/a')}.</p>"
                   + _img(files["maps"][0], f"{run_dir.name}: maps"))
    if "iou" in files:
        result = analysis["iou"]
        pngs = [f for f in files["iou"] if str(f).endswith(".png")]
        th = result.get("thresholds", {})
        out.append("<h3>Where do teacher and student agree? IoU with the object</h3>"
                   f"<p>Regions: CAM = {_e(th.get('cam', ''))}; similar = {_e(th.get('similar', ''))}; "
                   f"discrepant = {_e(th.get('discrepant', ''))}. Mean IoU (%) over {result.get('images')} "
                   "validation images.</p>"
                   + (_img(pngs[0], f"{run_dir.name}: IoU") if pngs else "") + _iou_table(result))
    if "calibration" in files:
        png = next(f for f in files["calibration"] if str(f).endswith(".png"))
        out.append("<h3>Calibration</h3>" + _img(png, f"{run_dir.name}: reliability"))
    if analysis["notes"]:
        out.append("<h3>Notes</h3><ul>" + "".join(f'<li class="note">{_e(n)}</li>' for n in analysis["notes"])
                   + "</ul>")
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else "(none)"
    out.append(f"<h3>Configuration (resolved)</h3><pre>{_e(config_text)}</pre>")
    ck = analysis.get("checkpoint", {})
    versions = [["kdengine (that wrote the checkpoint)", ck.get("kdengine_version", "–") or "–"],
                ["checkpoint after epoch", ck.get("epoch", "–")], ["analysed on", ck.get("device", "–")]]
    out.append("<h3>Versions and timings</h3>" + _table(["", ""], versions)
               + _timings(run_dir, records, analysis["seconds"]))
    return "\n".join(out)


def sweep_section(sweep_dir: Path, seed_key: Optional[str], work: Path) -> str:
    """The HTML of a sweep folder: its table and its runs' curves with seeds as bands."""
    from ..sweep.table import cells, header, not_averaged, sweep_table

    table = sweep_table(sweep_dir, seed_key)
    out = [f"<h2>Sweep {_e(sweep_dir.name)}</h2>", f'<p class="muted">{_e(sweep_dir.resolve())}</p>',
           f"<p>Validation top-1 (%): mean ± sample standard deviation over <code>{_e(table.seed_key)}</code> of the "
           "finished runs (n), at the last epoch and at each run's best epoch.</p>",
           _table(header(table), cells(table), "sweep")]
    missing = not_averaged(table)
    if missing:
        out.append("<p>Not in the means:</p><ul>" + "".join(f"<li>{_e(m)}</li>" for m in missing) + "</ul>")
    started = [sweep_dir / r.name for r in table.runs if (sweep_dir / r.name / "metrics.jsonl").is_file()]
    if started:
        png = plot_runs(started, work / f"{sweep_dir.name}-bands.png", table.seed_key,
                        title=f"{sweep_dir.name}: mean over {table.seed_key}, band: one standard deviation")
        out.append(_img(png, f"{sweep_dir.name}: curves"))
    return "\n".join(out)


def default_output(paths: Sequence[os.PathLike | str]) -> Path:
    """``<dir>/report.html`` for one run or sweep; ``kdengine-report.html`` here for several."""
    return Path(paths[0]) / "report.html" if len(paths) == 1 else Path("kdengine-report.html")


def write_report(paths: Sequence[os.PathLike | str], output: Optional[os.PathLike | str] = None, device: str = "auto",
                 images: int = 6, iou_images: int = 500, seed_key: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = None) -> Path:
    """Write the HTML report of run directories and sweep folders.

    Args:
        paths: run directories (with ``metrics.jsonl``) and sweep folders (with ``sweep.json``).
        output: the HTML file (default: :func:`default_output`).
        device: where the models are analysed (``auto``: CUDA when available).
        images: rows of each run's maps.
        iou_images: validation images of each run's IoU analysis.
        seed_key: the setting sweep tables average over (default: each sweep's).
        log: ``log(text)`` for progress lines.

    Returns:
        The report's path.

    Raises:
        FileNotFoundError: a path is neither a run directory nor a sweep folder.
    """
    from .. import info

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("give at least one run directory or sweep folder")
    for p in paths:
        if not (p / "sweep.json").is_file() and not (p / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{p} is neither a run directory (metrics.jsonl) nor a sweep folder (sweep.json)")
    output = Path(output) if output else default_output(paths)
    say = log or (lambda text: None)
    start = time.perf_counter()
    sections = []
    runs = [p for p in paths if not (p / "sweep.json").is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        if len(runs) > 1:
            png = plot_runs(runs, Path(tmp) / "compare.png", seed_key or "train.seed")
            sections.append("<h2>Comparison</h2>" + _img(png, "the runs' curves"))
        for p in paths:
            say(f"report: {p}")
            if (p / "sweep.json").is_file():
                sections.append(sweep_section(p, seed_key, Path(tmp)))
            else:
                sections.append(run_section(p, device, images, iou_images, say))
    env = _table(["", ""], [*info.report(), ["platform", platform.platform()]])
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>kdengine report: "
            f"{_e(', '.join(p.name for p in paths))}</title><style>{_STYLE}</style></head><body>\n"
            f"<h1>kdengine report</h1><p class=\"muted\">{_e(made)}; "
            f"{len(paths)} item(s); made in {time.perf_counter() - start:.1f} s.</p>\n"
            + "\n".join(sections)
            + f"\n<h2>Environment of this report</h2>{env}\n</body></html>\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = output.with_name(f".{output.name}.tmp")
    tmp_out.write_text(page, encoding="utf-8")
    os.replace(tmp_out, output)
    return output
