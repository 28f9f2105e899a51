"""Metrics: on-device accumulation inside the step (no host syncs), and the run's records —
JSON lines, CSV and TensorBoard — written from the host once per log interval or epoch."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional

import torch


class DeviceMeter:
    """Running sums of named scalars kept on the device; ``read`` syncs once for all of them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, values: dict[str, torch.Tensor], weight: int = 1) -> None:
        for name, value in values.items():
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros((), dtype=torch.float64, device=self.device)
            acc.add_(value.detach().to(torch.float64), alpha=weight)
        self.count.add_(weight)

    def read(self) -> dict[str, float]:
        """Means since the last reset (one device-to-host copy)."""
        if not self.sums:
            return {}
        names = list(self.sums)
        values = (torch.stack([self.sums[n] for n in names]) / self.count.clamp_min(1)).tolist()
        return dict(zip(names, values))

    def reset(self) -> None:
        self.sums.clear()
        self.count.zero_()


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (on the device)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return [hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks]


class RunLog:
    """``metrics.jsonl`` (one record per epoch and split), ``metrics.csv`` (the same, flat) and
    TensorBoard event files, all under the run directory. Appends, so a resumed run continues
    the same files (records at or after the resume point are dropped first)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def records(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Keep only the records of epochs before ``epoch`` (a resume restarts that epoch)."""
        if not self.enabled:
            return
        kept = [r for r in self.records() if r["epoch"] < epoch]
        self._rewrite(kept)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.jsonl)
        self._write_csv(records)

    def _write_csv(self, records: list[dict]) -> None:
        columns: list[str] = []
        for r in records:
            columns += [k for k in r if k not in columns]
        tmp = self.csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
        os.replace(tmp, self.csv)

    def write(self, record: dict, step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv(self.records())  # rewritten whole: columns may grow
        if self._tb is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step if step is not None else record["epoch"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
