"""Where a sweep's run stands, from its directory alone: its records, its configured epochs and the
attempts the sweep recorded in ``sweep-run.json`` (status, exit code, wall time, last error line).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import yaml

STATUS_FILE = "sweep-run.json"


def read_records(run_dir: os.PathLike | str) -> list[dict]:
    """The run's ``metrics.jsonl`` records so far (``[]`` before the first epoch ends)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return records


def configured_epochs(run_dir: os.PathLike | str) -> Optional[int]:
    """``train.epochs`` of the run's ``config.yaml`` (None before it is written)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    return int((yaml.safe_load(path.read_text()) or {}).get("train", {}).get("epochs", 0)) or None


def read_status(run_dir: os.PathLike | str) -> dict:
    """A run directory's ``sweep-run.json`` (``{}`` when there is none)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def run_state(run_dir: os.PathLike | str) -> dict:
    """Where a run stands, from its directory alone.

    Returns:
        ``{"status", "epochs_done", "epochs", "error", "wall_s"}``. ``status``: ``"completed"``
        (its records reach the last configured epoch, or its last attempt stopped at
        ``train.max_steps``), ``"failed"`` (its last attempt exited with an error), ``"unfinished"``
        (started, neither: stopped, or running now) or ``"missing"`` (never started).
    """
    run_dir = Path(run_dir)
    marker = read_status(run_dir)
    attempts = marker.get("attempts", [])
    wall = sum(a.get("wall_s") or 0.0 for a in attempts) if attempts else None
    last = attempts[-1] if attempts else {}
    if not (run_dir / "config.yaml").is_file():  # never started, or failed before its directory was set up
        failed = last.get("status") == "failed"
        return {"status": "failed" if failed else "missing", "epochs_done": 0, "epochs": None,
                "error": last.get("error") if failed else None, "wall_s": wall}
    epochs = configured_epochs(run_dir)
    done = 1 + max((r["epoch"] for r in read_records(run_dir) if r.get("split") == "val"), default=-1)
    if (epochs and done >= epochs) or (last.get("status") == "max_steps" and last.get("returncode") == 0):
        status = "completed"
    elif last.get("status") == "failed":
        status = "failed"
    else:
        status = "unfinished"
    return {"status": status, "epochs_done": done, "epochs": epochs,
            "error": last.get("error") if status == "failed" else None, "wall_s": wall}
