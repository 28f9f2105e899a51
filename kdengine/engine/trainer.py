"""The training engine: one joint step for M models under a distillation method.

``Trainer(cfg).fit()`` trains, evaluates every model and their ensemble each epoch, writes
metrics and atomic checkpoints into the run directory, and can continue a stopped run exactly
(``train.resume=auto``). The CLI (`kdengine train`) only parses and prints around it.
"""
from __future__ import annotations

import math
import random
import signal
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from .. import __version__
from ..methods import build_method
from . import checkpoint as ckpt
from .config import ExperimentConfig, num_classes_of, to_yaml, validate
from .datasets import build_loaders
from .evaluate import evaluate_models
from .metrics import DeviceMeter, RunLog
from .schedule import lr_lambda
from .setup import Precision, build_models, device_and_processes, model_tags
from .step import JointStep, build_optimizer


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run stopped and kept its last good checkpoint."""


class RunStatus(str, Enum):
    """How :meth:`Trainer.fit` ended (a ``str``: the summary and its JSON show the value)."""

    COMPLETED = "completed"  # every epoch ran
    MAX_STEPS = "max_steps"  # train.max_steps reached
    INTERRUPTED = "interrupted"  # Ctrl-C or request_stop()

    def __str__(self) -> str:
        return self.value


def _as_config(cfg) -> DictConfig:
    if cfg is None:
        cfg = OmegaConf.structured(ExperimentConfig)
    elif isinstance(cfg, ExperimentConfig):
        cfg = OmegaConf.structured(cfg)
    elif not isinstance(cfg, DictConfig):
        raise TypeError(f"cfg must be an ExperimentConfig or an OmegaConf DictConfig, got {type(cfg).__name__}")
    validate(cfg)
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_run_name(cfg: DictConfig) -> str:
    models = "-".join(m.name for m in cfg.models)
    return f"{cfg.method.name.replace('+', '-')}_{models}_seed{cfg.train.seed}"


class Trainer:
    """Trains ``cfg.models`` jointly with ``cfg.method``; see ``kdengine.engine.config``.

    ``fit()`` returns a summary dict: ``status`` (a :class:`RunStatus`: ``"completed"``,
    ``"max_steps"``, ``"interrupted"``), ``run_dir``, ``epoch``, ``global_step``, ``last`` (the
    last evaluation) and ``best`` (each model's best top-1). A non-finite loss raises
    ``NonFiniteLossError``.
    """

    def __init__(self, cfg=None, *, progress: bool = True, console=None):
        self.cfg = _as_config(cfg)
        cfg = self.cfg
        t = cfg.train
        self.show_progress = progress
        self.console = console
        self.device, self.dist = device_and_processes(t.device)
        self.is_cuda = self.device.type == "cuda"
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic and not self.is_cuda:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.precision = Precision.of(t, self.device)

        seed_everything(t.seed)
        self.num_classes = num_classes_of(cfg)
        self.tags = model_tags(cfg)
        self.roles = tuple(m.role for m in cfg.models)

        self.train_loader, self.val_loader = build_loaders(cfg, self.precision, self.dist)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {self.train_loader.num_samples} samples per process, fewer than "
                f"data.batch_size={cfg.data.batch_size}: no full batch to train on"
            )

        seed_everything(t.seed)  # the models' initialisation does not depend on the data set-up
        self.models = build_models(cfg, self.precision)
        self.method = build_method(
            cfg.method.name, list(self.models), roles=self.roles, num_classes=self.num_classes,
            num_samples=self.train_loader.dataset_size, **OmegaConf.to_container(cfg.method.options),
        ).to(self.device)
        self.trainable = tuple(self.method.trainable)
        for i, (spec, trainable) in enumerate(zip(cfg.models, self.trainable)):
            if not trainable:
                if not spec.checkpoint:
                    raise ValueError(
                        f"method {cfg.method.name} keeps models.{i} ({spec.name}, {spec.role}) frozen: give "
                        f"models.{i}.checkpoint (train one with `kdengine train method.name=vanilla`)"
                    )
                self.models[i].requires_grad_(False)
        self.forward_models = [self._wrap_ddp(m) if tr else m for m, tr in zip(self.models, self.trainable)]

        self.optimizer = build_optimizer(cfg.optim, self.models, [m.lr for m in cfg.models], self.trainable,
                                         self.method, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.optim, self.steps_per_epoch, t.epochs)
        )
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: dict[str, float] = {}
        self.meter = DeviceMeter(self.device)
        self.step = JointStep(self.models, self.method, self.optimizer, self.precision, self.tags,
                              forward_models=self.forward_models, dist=self.dist,
                              cuda_graph=t.cuda_graph and not self.dist.enabled)
        self._stop_requested = False

        self.run_dir = self._resolve_run_dir()
        self.log = RunLog(self.run_dir, tensorboard=t.tensorboard, enabled=self.dist.is_main)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))

    # ------------------------------------------------------------------ set-up

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return model
        ids = [self.device.index] if self.is_cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _resolve_run_dir(self) -> Path:
        t = self.cfg.train
        base = Path(t.output_dir)
        name = t.run_name or default_run_name(self.cfg)
        run_dir = base / name
        self.resume_from: Optional[Path] = None
        if t.resume == "auto":
            self.resume_from = ckpt.find_last(run_dir)
            return run_dir
        if t.resume:
            self.resume_from = Path(t.resume)
            if not self.resume_from.is_file():
                raise FileNotFoundError(f"train.resume={t.resume}: no such checkpoint")
            return self.resume_from.parent
        if t.run_name is None and run_dir.exists():
            n = 2  # a fresh run never overwrites an earlier one
            while (base / f"{name}-{n}").exists():
                n += 1
            run_dir = base / f"{name}-{n}"
        elif run_dir.exists() and ckpt.find_last(run_dir):
            raise FileExistsError(
                f"run directory {run_dir} already holds a checkpoint; continue it with train.resume=auto "
                f"or choose another train.run_name"
            )
        return run_dir

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "kdengine_version": __version__,
            "config": OmegaConf.to_container(self.cfg),
            "tags": self.tags,
            "models": [m.state_dict() for m in self.models],
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best": dict(self.best),
            "meter": {"sums": {k: v.cpu() for k, v in self.meter.sums.items()}, "count": self.meter.count.cpu()},
        }

    def save_checkpoint(self) -> Optional[Path]:
        if not self.dist.is_main:
            return None
        return ckpt.save_atomic(self.state_dict(), self.run_dir / ckpt.LAST)

    def _load_checkpoint(self, path: Path) -> None:
        state = ckpt.load(path, map_location=self.device)  # the RNG states stay on the CPU
        if len(state["models"]) != len(self.models):
            raise ValueError(f"checkpoint {path} holds {len(state['models'])} models, this run has {len(self.models)}")
        for model, weights in zip(self.models, state["models"]):
            model.load_state_dict(weights)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best = state["global_step"], dict(state["best"])
        self.meter.sums = {k: v.to(self.device) for k, v in state["meter"]["sums"].items()}
        self.meter.count = state["meter"]["count"].to(self.device)
        self.log.truncate_after(self.epoch)

    # ------------------------------------------------------------------ the step

    def train_step(self, images, labels, indices=None) -> dict[str, torch.Tensor]:
        """One joint step (:class:`~.step.JointStep`; captured on CUDA); on-device metrics."""
        return self.step(images, labels, indices)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, loader=None) -> dict[str, float]:
        """Top-1, top-5 and mean loss of every model and of their ensemble on the validation set."""
        result = evaluate_models(self.models, self.tags, loader or self.val_loader, self.device,
                                 self.step.autocast, self.dist)
        for model, trainable in zip(self.models, self.trainable):
            model.train(trainable)
        return result

    # ------------------------------------------------------------------ the loop

    def _install_sigint(self):
        """First Ctrl-C: finish the current step, save, stop. Second: stop at once."""
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop_requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.request_stop()
            self._say("[yellow]Ctrl-C: saving a checkpoint after this step (again to abort)[/]")

        signal.signal(signal.SIGINT, handler)
        return previous

    def request_stop(self) -> None:
        """Stop after the current step with a checkpoint, as Ctrl-C does (e.g. from another
        thread, where no SIGINT handler is installed); ``fit`` then returns ``"interrupted"``."""
        self._stop_requested = True

    def _say(self, text: str) -> None:
        if not self.dist.is_main:
            return
        if self.console is not None:
            self.console.print(text)
        else:
            print(text)

    def _check_finite(self, values: dict[str, float]) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            where = f"epoch {self.epoch}, step {self.global_step}"
            last = self.run_dir / ckpt.LAST
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"non-finite training loss at {where} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                f"stopped; {kept}. Lower optim.lr or check the data."
            )

    def fit(self) -> dict[str, Any]:
        """Train from where the run stands (epoch 0, or the resumed position) to ``train.epochs``,
        or until it stops early.

        Returns:
            The summary (see the class docstring).

        Raises:
            NonFiniteLossError: the training loss became NaN or inf.
        """
        t = self.cfg.train
        previous_handler = self._install_sigint()
        status = RunStatus.COMPLETED
        progress = self._progress()
        try:
            with progress:
                task = progress.add_task("train", total=t.epochs * self.steps_per_epoch,
                                         completed=self.global_step, info="") if progress else None
                while self.epoch < t.epochs:
                    stopped = self._train_loop(progress, task)
                    if stopped is not None:
                        status = stopped
                        break
                    self._end_epoch(progress)
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            self.log.close()
        last = [r for r in self.log.records() if r.get("split") == "val"] if self.dist.is_main else []
        return {"status": status, "run_dir": str(self.run_dir), "epoch": self.epoch,
                "global_step": self.global_step, "last": last[-1] if last else {}, "best": dict(self.best)}

    def _progress(self):
        if not (self.show_progress and self.dist.is_main):
            return _NoProgress()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=self.console, transient=False)

    def _train_loop(self, progress, task) -> Optional[RunStatus]:
        """The current epoch's steps from ``step_in_epoch`` on. Returns the run's status when it
        stops inside the epoch (with a checkpoint), None when the epoch's steps are done."""
        t = self.cfg.train
        self.method.start_epoch(self.epoch, t.epochs)
        for model, trainable in zip(self.models, self.trainable):
            model.train(trainable)
        self.train_loader.set_epoch(self.epoch, start_batch=self.step_in_epoch)
        if progress:
            progress.update(task, description=f"epoch {self.epoch + 1}/{t.epochs}")
        window_start, window_images = time.perf_counter(), 0
        for images, labels, indices in self.train_loader:
            self.meter.add(self.train_step(images, labels, indices))
            self.scheduler.step()
            self.step_in_epoch += 1
            self.global_step += 1
            window_images += labels.shape[0] * self.dist.world_size
            if self.global_step % t.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                self._log_running(progress, task, rate)
                window_start, window_images = time.perf_counter(), 0
            stop = self._stop_status()
            if stop is not None or (t.checkpoint_every and self.global_step % t.checkpoint_every == 0):
                self._save_checked()
            if stop is RunStatus.INTERRUPTED:
                self._say(f"stopped at epoch {self.epoch}, step {self.global_step}; continue with "
                          f"train.resume=auto (run directory {self.run_dir})")
            if stop is not None:
                return stop
        return None

    def _log_running(self, progress, task, rate: float) -> None:
        """One host sync every ``log_every`` steps: the running means, checked, on the progress bar."""
        running = self.meter.read()
        self._check_finite({k: v for k, v in running.items() if not k.endswith("/top1")})
        if progress:
            info = f"{rate:,.0f} img/s  loss {running.get('loss', float('nan')):.3f}  " + "  ".join(
                f"{k} {v:.3f}" for k, v in running.items() if k != "loss" and "/top1" not in k)
            progress.update(task, completed=self.global_step, info=info)

    def _stop_status(self) -> Optional[RunStatus]:
        """Why the run stops after this step (``train.max_steps`` first), or None."""
        max_steps = self.cfg.train.max_steps
        if max_steps and self.global_step >= max_steps:
            return RunStatus.MAX_STEPS
        if self._stop_requested:
            return RunStatus.INTERRUPTED
        return None

    def _save_checked(self) -> None:
        """A checkpoint inside the epoch, once the running losses are checked: a good checkpoint
        is never overwritten by one with NaNs."""
        self._check_finite(self.meter.read())
        self.save_checkpoint()

    def _end_epoch(self, progress) -> None:
        """After the epoch's last step: the method's epoch end, evaluation, the epoch's records,
        the checkpoint and the curves."""
        epoch = self.epoch
        train_metrics = self.meter.read()
        self._check_finite(train_metrics)
        self.meter.reset()
        self.method.end_epoch(epoch)
        # BatchNorm statistics of the models and of the method's connectors; the method's other
        # buffers (e.g. ADM's per-sample predictions of this rank's shard) stay per rank.
        norms = [m for m in self.method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.dist.broadcast_buffers(list(self.models) + norms)
        val = self.evaluate()
        for tag in self.tags + ["ensemble"]:
            self.best[tag] = max(self.best.get(tag, float("-inf")), val[f"{tag}/top1"])
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.write({"epoch": epoch, "split": "train", "step": self.global_step, "lr": float(lr),
                        **{k: (100 * v if k.endswith("/top1") else v) for k, v in train_metrics.items()}},
                       step=self.global_step)
        self.log.write({"epoch": epoch, "split": "val", "step": self.global_step, **val}, step=self.global_step)
        self.epoch += 1
        self.step_in_epoch = 0
        self.save_checkpoint()
        if self.dist.is_main:
            from ..viz.curves import plot_curves

            plot_curves(self.log.records(), self.run_dir / "curves.png")
        if progress:
            summary = "  ".join(f"{tag} {val[f'{tag}/top1']:.2f}" for tag in self.tags + ["ensemble"])
            progress.console.print(f"epoch {epoch + 1}/{self.cfg.train.epochs}  val top-1: {summary}")


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __bool__(self):
        return False

    def add_task(self, *a, **k):
        return None

    def update(self, *a, **k):
        pass
