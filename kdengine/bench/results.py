"""Where benchmark rows go and what every row carries: the output path (by default a file in the
current directory, never in the installed package), the long-format CSV, and the provenance
columns (commit, versions, machine)."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .. import _extension
from .._version import __version__

#: The folder, relative to the current directory, that ``kdengine bench`` writes to by default.
DEFAULT_DIR = "kdengine-bench"


def default_output(suite: str) -> Path:
    """The CSV ``kdengine bench <suite>`` appends to when no ``--output`` is given.

    Args:
        suite: the benchmark's name (``"ops"``, ``"data"``).

    Returns:
        ``./kdengine-bench/<suite>.csv``, absolute, under the current directory at call time.
    """
    return Path.cwd() / DEFAULT_DIR / f"{suite}.csv"


def bench_device(name: Optional[str]) -> torch.device:
    """The device a benchmark runs on.

    Args:
        name: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None (CUDA when torch sees a GPU).

    Returns:
        The device.

    Raises:
        SettingError: not a CPU or CUDA device, or CUDA asked for where torch sees none.
    """
    from ..errors import SettingError

    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as exc:
        raise SettingError("device", f"is not a torch device: {name!r} ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise SettingError("device", f"must be a CPU or CUDA device, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", f"is {name!r} but this torch build sees no CUDA device")
    return dev


def append_rows(path, rows: list[dict]) -> None:
    """Append rows to a long-format CSV, writing the header when the file is new.

    A results file grows columns as the benchmarks do: rows with a column the file lacks widen it
    (earlier rows get it empty), and rows without one of the file's columns leave it empty.

    Args:
        path: the CSV file; its folder is created when missing.
        rows: dicts with the same keys, in the same order.

    Raises:
        ValueError: the file's columns and the rows' differ both ways (each has columns the other
            lacks): most likely another benchmark's file.
    """
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    header = None
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    if header and header != fields:
        added, missing = [k for k in fields if k not in header], [k for k in header if k not in fields]
        if added and missing:
            raise ValueError(f"{path} has columns {header}, these rows have {fields}; use a new file")
        if added:  # widen the file: rewrite it with the new columns at the end, atomically
            with open(path, newline="") as f:
                old = list(csv.DictReader(f))
            header = header + added
            tmp = path.with_suffix(path.suffix + ".tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(old)
            os.replace(tmp, path)
        fields = header
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if not header:
            writer.writeheader()
        writer.writerows(rows)


def _git(args: list, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def git_commit(cwd=None) -> str:
    """The commit of the code a benchmark ran.

    From ``git`` when the current directory is inside a kdengine checkout (its top level holds
    ``kdengine/_version.py``), with ``-dirty`` when tracked files other than
    ``benchmarks/results`` have changes; otherwise the commit pip recorded for an install from a
    VCS URL; otherwise ``"unknown"``. The folder of the installed package is never asked: for an
    installed (non-editable) kdengine it is site-packages, whatever repository that lies in.

    Args:
        cwd: the directory to ask git in (default: the current directory).

    Returns:
        A 12-digit short hash (``-dirty`` appended when so), the recorded commit, or ``"unknown"``.
    """
    try:
        top = Path(_git(["rev-parse", "--show-toplevel"], cwd or os.getcwd()))
        if (top / "kdengine" / "_version.py").is_file():
            sha = _git(["rev-parse", "--short=12", "HEAD"], top)
            # Appending results must not mark the next run dirty: benchmarks/results is left out.
            dirty = _git(["status", "--porcelain", "--untracked-files=no", "--", ".",
                          ":(exclude)benchmarks/results"], top)
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return _installed_commit() or "unknown"


def _installed_commit() -> Optional[str]:
    """The commit in the installed distribution's ``direct_url.json`` (``pip install git+...``)."""
    try:
        text = importlib.metadata.distribution("kdengine").read_text("direct_url.json")
        commit = json.loads(text or "{}").get("vcs_info", {}).get("commit_id")
    except (importlib.metadata.PackageNotFoundError, ValueError, AttributeError):
        return None
    return commit[:12] if commit else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``, else ``platform``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device) -> dict:
    """The columns every result row carries: time, commit, versions, device, threads, cores and
    the CPU kernels' output-buffer cache bound (0 = off)."""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "kdengine_version": __version__,
        "torch_version": torch.__version__,
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "cpu_buffer_cache_mb": _extension.cpu_buffer_cache_limit_mb(),
    }
