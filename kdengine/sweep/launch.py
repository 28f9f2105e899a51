"""Running a sweep's runs: each is ``kdengine train`` in its own process with
``train.resume=auto-or-new`` (a new run, or an interrupted one continued exactly where its last
checkpoint left it), one after the other on this machine, or as jobs on a SLURM cluster through
submitit.

Each attempt is recorded in the run directory's ``sweep-run.json`` (:mod:`.status`).
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .plan import PlannedRun, SweepError
from .status import STATUS_FILE, read_status, run_state

#: ``kdengine train``'s exit status after Ctrl-C (it saved a checkpoint and stopped).
INTERRUPTED = 130


def train_command(run: PlannedRun, sweep_dir: os.PathLike | str, config: Optional[str] = None,
                  quiet: bool = False) -> list[str]:
    """The ``kdengine train`` command line of a run (with this interpreter). Without the per-run
    HTML report: `kdengine viz report` draws those of the runs worth a look."""
    command = [sys.executable, "-m", "kdengine", "train", "--no-report"]
    if config:
        command += ["--config", config]
    if quiet:
        command.append("--quiet")
    return command + [*run.overrides, f"train.output_dir={Path(sweep_dir).resolve()}",
                      f"train.run_name={run.name}", "train.resume=auto-or-new"]


def _write_status(run_dir: Path, attempt: dict) -> None:
    marker = read_status(run_dir)
    marker.setdefault("attempts", []).append(attempt)
    marker.update({k: attempt[k] for k in ("status", "returncode")})
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, run_dir / STATUS_FILE)


_CHILD: Optional[subprocess.Popen] = None  # the training process of this job (for submitit's checkpoint)


def run_training(command: Sequence[str], run_dir: os.PathLike | str, forward_sigterm: bool = False) -> dict:
    """Run one ``kdengine train`` process to its end and record the attempt.

    Its output passes through (the error stream is also kept, for the last error line). Ctrl-C
    reaches the process, which saves a checkpoint and stops; this then waits for it.

    Args:
        command: from :func:`train_command`.
        run_dir: the run's directory (where ``sweep-run.json`` goes).
        forward_sigterm: a SIGTERM to this process (``timeout``, a job scheduler's stop) becomes a
            SIGINT to the training process, which then stops with a checkpoint as after Ctrl-C
            (from the main thread only).

    Returns:
        The attempt: ``{"status": "completed" | "max_steps" | "interrupted" | "failed", "returncode",
        "wall_s", "started", "error"}``.
    """
    global _CHILD
    run_dir = Path(run_dir)
    start, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S")
    tail: collections.deque = collections.deque(maxlen=20)
    proc = subprocess.Popen(list(command), stderr=subprocess.PIPE, text=True, errors="replace")
    _CHILD = proc

    def pump():
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                tail.append(line.rstrip())

    def stop_child(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    previous = None
    if forward_sigterm and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, stop_child)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too: let it save its checkpoint
        returncode = proc.wait()
    finally:
        _CHILD = None
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    reader.join(timeout=5)
    if returncode == 0:
        status = "completed" if run_state(run_dir)["status"] == "completed" else "max_steps"
    elif returncode in (INTERRUPTED, -signal.SIGINT):
        status = "interrupted"
    else:
        status = "failed"
    attempt = {"status": status, "returncode": returncode, "wall_s": round(time.perf_counter() - start, 1),
               "started": started, "error": tail[-1][:500] if tail and status == "failed" else None}
    _write_status(run_dir, attempt)
    return attempt


class LocalLauncher:
    """The runs one after the other in this process's terminal; stops at the first interruption
    (Ctrl-C, or SIGTERM, which the running training receives as Ctrl-C)."""

    def launch(self, jobs: Sequence[tuple[PlannedRun, list[str], Path]], say: Callable[[str], None]) -> dict:
        """Run ``(run, command, run_dir)`` jobs in order.

        Returns:
            ``{run name: attempt}`` for the runs started; an interrupted run ends the loop.
        """
        results = {}
        for i, (run, command, run_dir) in enumerate(jobs, 1):
            # Another process sweeping into the same folder may have finished it since the plan
            # was read: starting it again would fail and mark a finished run failed.
            if run_state(run_dir)["status"] == "completed":
                say(f"[{i}/{len(jobs)}] {run.name}: finished meanwhile (another process): skipped")
                continue
            say(f"[{i}/{len(jobs)}] {run.name}")
            attempt = run_training(command, run_dir, forward_sigterm=True)
            results[run.name] = attempt
            say(f"[{i}/{len(jobs)}] {run.name}: {attempt['status']} in {attempt['wall_s']:.0f} s"
                + (f" ({attempt['error']})" if attempt["error"] else ""))
            if attempt["status"] == "interrupted":
                break
        return results


class TrainJob:
    """What a submitit job runs: one ``kdengine train`` process (:func:`run_training`).

    On a SLURM time-out or preemption submitit calls ``checkpoint``: the training process gets
    SIGINT, saves a checkpoint after its current step, and the job is requeued to continue it.
    """

    def __call__(self, command: Sequence[str], run_dir: str) -> dict:
        return run_training(command, run_dir)

    def checkpoint(self, command: Sequence[str], run_dir: str):
        import submitit

        child = _CHILD
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        return submitit.helpers.DelayedSubmission(TrainJob(), command, run_dir)


class SubmititLauncher:
    """Each run a submitit job: SLURM when the cluster has it (``cluster="local"``: processes on
    this machine, all at once; what the tests use).

    Args:
        folder: submitit's logs and pickles.
        cluster: ``"slurm"``, ``"local"``, ``"debug"`` or None (submitit's detection).
        parameters: for ``executor.update_parameters``, e.g. ``{"timeout_min": 60,
            "gpus_per_node": 1, "slurm_partition": "dev"}``.
        wait: wait for the jobs (else return once they are submitted).

    Raises:
        ModuleNotFoundError: submitit is not installed.
        SweepError: submitit refuses the cluster or a parameter.
    """

    def __init__(self, folder: os.PathLike | str, cluster: Optional[str] = None, parameters: Optional[dict] = None,
                 wait: bool = True):
        try:
            import submitit
        except ImportError:
            raise ModuleNotFoundError("--launcher submitit needs the submitit package: pip install "
                                      "'kdengine[sweep]' (or pip install submitit)", name="submitit") from None
        self.wait = wait
        try:  # set up now: a wrong cluster or parameter is an error before any run starts
            self.executor = submitit.AutoExecutor(folder=Path(folder), cluster=cluster)
            self.executor.update_parameters(**{"name": "kdengine-sweep", **dict(parameters or {})})
        except (NameError, AssertionError, ValueError, RuntimeError) as exc:  # submitit's own wording
            raise SweepError(f"submitit: {str(exc).splitlines()[0]}") from None

    def launch(self, jobs: Sequence[tuple[PlannedRun, list[str], Path]], say: Callable[[str], None]) -> dict:
        executor = self.executor
        submitted = []
        for run, command, run_dir in jobs:
            job = executor.submit(TrainJob(), list(command), str(run_dir))
            say(f"submitted {run.name}: job {job.job_id} ({executor.cluster})")
            submitted.append((run, run_dir, job))
        if not self.wait:
            return {}
        results = {}
        for run, run_dir, job in submitted:
            try:
                results[run.name] = job.result()
            except Exception as exc:  # the job itself failed (not the training: that is a result)
                results[run.name] = {"status": "failed", "returncode": None, "wall_s": 0.0,
                                     "error": str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else
                                     type(exc).__name__}
                _write_status(Path(run_dir), {**results[run.name], "started": None})
            r = results[run.name]
            say(f"{run.name}: {r['status']}" + (f" ({r['error']})" if r.get("error") else ""))
        return results
