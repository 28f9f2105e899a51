"""Many runs, one table: `kdengine sweep` runs the cartesian product of comma-separated overrides as
run directories under one sweep folder (finished runs skipped, unfinished ones resumed), locally or
through submitit, and `kdengine sweep table` writes the mean ± std table over seeds."""
from .launch import LocalLauncher, SubmititLauncher, TrainJob, run_training, train_command
from .plan import PlannedRun, SweepError, load_plan, parse_overrides, plan_runs, split_values
from .runner import DEFAULT_OUTPUT_DIR, Sweep, default_name, describe, launch_sweep, prepare_sweep
from .status import read_status, run_state
from .table import SweepTable, sweep_table, to_csv, to_markdown, write_tables

__all__ = ["DEFAULT_OUTPUT_DIR", "LocalLauncher", "PlannedRun", "SubmititLauncher", "Sweep", "SweepError",
           "SweepTable", "TrainJob", "default_name", "describe", "launch_sweep", "load_plan", "parse_overrides",
           "plan_runs", "prepare_sweep", "read_status", "run_state", "run_training", "split_values", "sweep_table",
           "to_csv", "to_markdown", "train_command", "write_tables"]
