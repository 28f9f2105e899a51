"""Run directories written by hand (config.yaml, metrics.jsonl; no training) for tables and plots."""
import json
from pathlib import Path

from kdengine.engine import load_config
from kdengine.engine.config import to_yaml


def fake_run(run_dir, overrides, top1: dict, epochs: int = 2, done: int = None) -> Path:
    """A run directory of ``overrides`` whose validation top-1 of each tag rises to ``top1[tag]`` at
    the last epoch (one point less per earlier epoch); ``done`` epochs recorded (default all)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides=[*overrides, f"train.epochs={epochs}", "train.device=cpu"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    lines = []
    for epoch in range(epochs if done is None else done):
        behind = epochs - 1 - epoch
        lines.append({"epoch": epoch, "split": "train", "loss": 1.0 + behind})
        lines.append({"epoch": epoch, "split": "val", **{f"{t}/top1": v - behind for t, v in top1.items()},
                      **{f"{t}/loss": 1.0 + behind for t in top1}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir
