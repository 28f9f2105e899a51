"""What a sweep runs: the cartesian product of comma-separated overrides, one named run directory
each under the sweep folder, and the plan file (``sweep.json``) that remembers them.

``method.name=dml,dml+adm train.seed=0,1,2 train.epochs=6`` is two axes (2 x 3 runs) and one
setting every run shares. A value is split at the commas outside brackets, braces and quotes, so
``optim.milestones=[150,225]`` stays one value and ``method.options.adm={gamma: 0},{alpha: 0, beta: 0}``
is an axis of two mappings (several settings that change together, e.g. the paper's ablations).
Axes vary in the order given, the last fastest. A run's directory is named by its axis values
(``method.name=dml+adm_train.seed=0``); the settings shared by every run are not in the name. A
trailing comma makes a one-value axis (``method.name=kd, train.seed=0,1``: runs named
``method.name=kd_train.seed=0`` ...), so that sweeps run one value at a time into one folder (two
processes on two cores, say) name their runs apart.

Re-running a sweep into the same folder adds the runs it has not planned yet; a run whose name is
planned already must have the same settings (else the folder holds two experiments under one
name, which is refused).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

PLAN = "sweep.json"

#: Settings the sweep sets for every run itself.
OWNED = ("train.output_dir", "train.run_name", "train.resume")

_MAX_NAME = 120


class SweepError(ValueError):
    """A sweep that cannot be planned (its message says why)."""


def split_values(text: str) -> list[str]:
    """``"a,[1,2],{x: 1, y: 2}"`` -> ``["a", "[1,2]", "{x: 1, y: 2}"]``: commas at the top level only."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_overrides(overrides: Sequence[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Split ``key=value`` items into axes (several values, or one with a trailing comma) and
    shared settings (one value).

    Returns:
        ``(axes, fixed)``: ``[(key, [values])]`` in the given order, and the one-value items.

    Raises:
        SweepError: an item without ``=``, a key given twice, an empty value in a list, or a
            setting the sweep owns.
    """
    axes, fixed, seen = [], [], set()
    for item in overrides:
        if "=" not in item:
            raise SweepError(f"override {item!r} must look like key=value or key=v1,v2,... (e.g. train.seed=0,1,2)")
        key, value = (part.strip() for part in item.split("=", 1))
        if not key:
            raise SweepError(f"override {item!r} has no key")
        if key in OWNED:
            raise SweepError(f"{key} is set by the sweep for each run (its folder, name and resume); leave it out")
        if key in seen:
            raise SweepError(f"{key} is given twice; list its values once, separated by commas")
        seen.add(key)
        values = split_values(value)
        if len(values) == 2 and values[0] and values[1] == "":  # "key=value,": a one-value axis
            axes.append((key, values[:1]))
        elif len(values) > 1:
            if any(v == "" for v in values):
                raise SweepError(f"override {item!r} has an empty value between its commas")
            if len(set(values)) != len(values):
                raise SweepError(f"override {item!r} lists a value twice")
            axes.append((key, values))
        else:
            fixed.append(f"{key}={value}")
    return axes, fixed


def _slug(text: str) -> str:
    """A file-name-safe spelling: letters, digits and ``.+=-`` kept, anything else one ``-``."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9.+=-]", "-", text)).strip("-") or "none"


def run_name(values: dict) -> str:
    """The directory name of a run from its axis values, e.g. ``method.name=dml_train.seed=0``
    (``"run"`` for a sweep without axes); long names end in a hash of the whole."""
    name = "_".join(f"{_slug(k)}={_slug(v)}" for k, v in values.items()) or "run"
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name[: _MAX_NAME - 9]}-{digest}"
    return name


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its directory name, its axis values and every override it trains with."""

    name: str
    values: dict  # axis key -> value as given
    overrides: tuple  # the shared settings, then the axis values, as key=value


def plan_runs(overrides: Sequence[str]) -> list[PlannedRun]:
    """The runs of a sweep's overrides (see the module docstring).

    Raises:
        SweepError: as :func:`parse_overrides`, or two runs whose names coincide.
    """
    axes, fixed = parse_overrides(overrides)
    runs, names = [], {}
    for combo in itertools.product(*(values for _, values in axes)):
        values = {key: value for (key, _), value in zip(axes, combo)}
        name = run_name(values)
        if name in names:
            raise SweepError(f"runs {names[name]} and {values} would share the directory {name!r}; "
                             "spell the values differently")
        names[name] = values
        runs.append(PlannedRun(name, values, tuple(fixed) + tuple(f"{k}={v}" for k, v in values.items())))
    return runs


# ----------------------------------------------------------------------------------- the plan file


@dataclass
class SweepPlan:
    """``sweep.json``: the experiment file and every run planned in this folder so far."""

    config: Optional[str]  # the --config file (absolute), or None for the embedded default
    runs: list[PlannedRun]
    seed_key: str = "train.seed"
    config_sha256: Optional[str] = None  # of the --config file's bytes when it was planned

    def to_json(self) -> dict:
        return {"version": 1, "config": self.config, "config_sha256": self.config_sha256, "seed_key": self.seed_key,
                "runs": [{**asdict(r), "overrides": list(r.overrides)} for r in self.runs]}

    @classmethod
    def from_json(cls, data: dict) -> "SweepPlan":
        runs = [PlannedRun(r["name"], dict(r["values"]), tuple(r["overrides"])) for r in data.get("runs", [])]
        return cls(data.get("config"), runs, data.get("seed_key", "train.seed"), data.get("config_sha256"))


def file_sha256(path: Optional[str]) -> Optional[str]:
    """The SHA-256 of a file's bytes (None for None or a missing file)."""
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_plan(sweep_dir: os.PathLike | str) -> SweepPlan:
    """The plan of a sweep folder.

    Raises:
        FileNotFoundError: no ``sweep.json`` there.
    """
    path = Path(sweep_dir) / PLAN
    if not path.is_file():
        raise FileNotFoundError(f"{sweep_dir} has no {PLAN} (is it a folder made by `kdengine sweep`?)")
    return SweepPlan.from_json(json.loads(path.read_text()))


def merge_plan(sweep_dir: os.PathLike | str, config: Optional[str], runs: Sequence[PlannedRun],
               seed_key: str = "train.seed", write: bool = True) -> SweepPlan:
    """This sweep's runs added to the folder's plan (written back unless ``write`` is False).

    Args:
        sweep_dir: the sweep folder.
        config: the experiment file, absolute, or None.
        runs: the runs of this invocation.
        seed_key: the setting the tables average over.
        write: write ``sweep.json`` (False: a dry run changes nothing).

    Returns:
        The merged plan: the folder's earlier runs first, then the new ones.

    An experiment file at another path with the same bytes as the planned one (the sweep folder
    committed and resumed from another checkout) is the same experiment: the plan then names the
    new path.

    Raises:
        SweepError: the folder's plan uses another experiment file, or holds a run of the same
            name with other settings.
    """
    sweep_dir = Path(sweep_dir)
    digest = file_sha256(config)
    plan = load_plan(sweep_dir) if (sweep_dir / PLAN).is_file() else SweepPlan(config, [], seed_key, digest)
    same_file = plan.config is not None and config is not None and plan.config_sha256 == digest is not None
    if plan.config != config and not same_file:
        raise SweepError(f"{sweep_dir} is a sweep of --config {plan.config or '(the embedded default)'}, not "
                         f"{config or '(the embedded default)'}; choose another --name")
    plan.config, plan.config_sha256 = config, digest
    known = {r.name: r for r in plan.runs}
    for run in runs:
        if run.name not in known:
            plan.runs.append(run)
            known[run.name] = run
        elif sorted(known[run.name].overrides) != sorted(run.overrides):
            raise SweepError(f"{sweep_dir / run.name} was planned with {list(known[run.name].overrides)}, now "
                             f"{list(run.overrides)}; choose another --name for a sweep with other shared settings, "
                             "or name the setting that differs in the runs' names with a trailing comma "
                             "(e.g. method.name=kd,)")
    plan.seed_key = seed_key
    if write:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tmp = sweep_dir / f".{PLAN}.tmp"
        tmp.write_text(json.dumps(plan.to_json(), indent=1) + "\n")
        os.replace(tmp, sweep_dir / PLAN)
    return plan
