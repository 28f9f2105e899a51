"""A sweep from its overrides to its table: plan the runs (:mod:`.plan`), check every run's
configuration before anything starts, skip the finished runs, launch the others (:mod:`.launch`)
and write the tables (:mod:`.table`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..engine.config import ConfigError, load_config
from .launch import LocalLauncher, train_command
from .plan import SweepPlan, merge_plan, plan_runs
from .status import run_state

DEFAULT_OUTPUT_DIR = "sweeps"


@dataclass
class Sweep:
    """One invocation of a sweep: its folder, the merged plan, this invocation's runs and where
    each stands."""

    sweep_dir: Path
    config: Optional[str]
    plan: SweepPlan
    runs: list  # PlannedRun, this invocation's
    states: dict  # run name -> run_state(...)

    @property
    def pending(self) -> list:
        """This invocation's runs that have not finished (failed ones are tried again)."""
        return [r for r in self.runs if self.states[r.name]["status"] != "completed"]


def default_name(config: Optional[str]) -> str:
    """The sweep folder's default name: the experiment file's stem, ``embedded`` without one."""
    return Path(config).stem if config else "embedded"


def prepare_sweep(overrides: Sequence[str], config: Optional[str] = None, name: Optional[str] = None,
                  output_dir: os.PathLike | str = DEFAULT_OUTPUT_DIR, seed_key: str = "train.seed",
                  dry_run: bool = False, here: bool = True) -> Sweep:
    """Plan a sweep and check it: every run's configuration is loaded and validated first.

    Args:
        overrides: ``key=value`` and ``key=v1,v2,...`` items.
        config: the experiment YAML (None: the embedded default).
        name: the sweep folder's name under ``output_dir`` (default: :func:`default_name`).
        output_dir: the parent of sweep folders.
        seed_key: the setting the tables average over.
        dry_run: write nothing (the plan file included).
        here: the runs train on this machine; False (a cluster's jobs): a ``train.device`` this
            machine lacks (CUDA on a login node) is not an error here.

    Returns:
        The :class:`Sweep`.

    Raises:
        kdengine.sweep.SweepError: the overrides or the folder's plan do not allow it.
        ConfigError: a run's configuration is invalid (the message names the run).
        FileNotFoundError: ``config`` does not exist.
    """
    if config is not None:
        if not Path(config).is_file():
            raise FileNotFoundError(f"--config {config}: no such file")
        config = str(Path(config).resolve())
    runs = plan_runs(overrides)
    for run in runs:
        try:
            load_config(config, run.overrides if here else [*run.overrides, "train.device=cpu"])
        except ConfigError as exc:
            raise ConfigError(f"run {run.name}: {exc}") from None
    sweep_dir = Path(output_dir) / (name or default_name(config))
    plan = merge_plan(sweep_dir, config, runs, seed_key, write=not dry_run)
    return Sweep(sweep_dir, config, plan, runs, {r.name: run_state(sweep_dir / r.name) for r in runs})


def describe(sweep: Sweep) -> list[str]:
    """One line per run of the invocation: its name, where it stands and what launching does."""
    lines = []
    for run in sweep.runs:
        s = sweep.states[run.name]
        what = {"completed": "finished: skipped",
                "failed": f"failed before ({s['error'] or 'see its log'}): tried again, resuming",
                "unfinished": f"resumes after epoch {s['epochs_done']}/{s['epochs'] or '?'}",
                "missing": "starts"}[s["status"]]
        lines.append(f"{run.name}: {what}")
    return lines


def launch_sweep(sweep: Sweep, launcher=None, quiet: bool = False, say: Callable[[str], None] = print) -> dict:
    """Launch the sweep's unfinished runs.

    Args:
        sweep: from :func:`prepare_sweep`.
        launcher: a :class:`~.launch.LocalLauncher` (default) or :class:`~.launch.SubmititLauncher`.
        quiet: the runs draw no progress bar.
        say: where progress lines go.

    Returns:
        ``{run name: attempt}`` of the runs launched (empty when every run had finished, or for
        jobs not waited for).
    """
    launcher = launcher or LocalLauncher()
    jobs = [(run, train_command(run, sweep.sweep_dir, sweep.config, quiet), sweep.sweep_dir / run.name)
            for run in sweep.pending]
    if not jobs:
        return {}
    return launcher.launch(jobs, say)

