"""The training engine: one joint step for M models under a distillation method.

``Trainer(cfg).fit()`` trains, evaluates every model and their ensemble each epoch, writes
metrics and atomic checkpoints into the run directory, and can continue a stopped run exactly
(``train.resume=auto``). The CLI (`kdengine train`) only parses and prints around it.
"""
from __future__ import annotations

import glob
import math
import random
import re
import shutil
import signal
import tempfile
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
from ..data.augment import BatchMix
from ..methods import build_method
from . import checkpoint as ckpt
from .config import ConfigError, ExperimentConfig, config_differences, num_classes_of, to_yaml, validate
from .datasets import build_loaders
from .ema import ModelEma
from .evaluate import evaluate_run_models
from .metrics import ACCURACY_METRICS, PRIMARY_METRICS, DeviceMeter, RunLog
from .schedule import lr_lambda
from .setup import Precision, build_models, device_and_processes, model_tags, run_method_options
from .step import JointStep, build_optimizer

#: ``train.resume`` values that look for the stopped run themselves (``auto``: one must exist).
RESUME_AUTO = ("auto", "auto-or-new")


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


def _where(at: dict) -> str:
    """A checkpoint's position (:func:`.checkpoint.position`) as the messages say it: 1-based epochs."""
    if at["epoch"] >= at["epochs"]:
        return f"finished, {at['epochs']} epochs"
    return f"stopped in epoch {at['epoch'] + 1}/{at['epochs']}, {at['global_step']} steps done"


#: Settings that only say where a run is; they may differ on resume without a word.
_RUN_LOCATION = ("train.resume", "train.run_name", "train.output_dir")


def _defines_the_run(key: str) -> bool:
    """Whether a setting fixes what a checkpoint holds (the models, the method and its state, the
    optimizer's kind, the classes): a resume with another value would load into the wrong set-up."""
    parts = key.split(".")
    if parts[0] == "models":
        return len(parts) < 3 or parts[2] in ("name", "role", "kwargs")
    return parts[0] == "method" or key in ("optim.name", "data.dataset", "data.num_classes",
                                           "data.embedded.num_classes")


def _text(value) -> str:
    """A setting's value as it is typed in an override."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _is_accuracy(key: str) -> bool:
    """A training metric the step reports as a fraction (``<tag>/top1``, ``<tag>/pixel_accuracy``)."""
    return key.rpartition("/")[2] in ACCURACY_METRICS


def default_run_name(cfg: DictConfig) -> str:
    models = "-".join(m.name for m in cfg.models)
    return f"{cfg.method.name.replace('+', '-')}_{models}_seed{cfg.train.seed}"


class Trainer:
    """Trains ``cfg.models`` jointly with ``cfg.method``; see ``kdengine.engine.config``.

    ``fit()`` returns a summary dict: ``status`` (a :class:`RunStatus`: ``"completed"``,
    ``"max_steps"``, ``"interrupted"``), ``run_dir``, ``epoch``, ``global_step``, ``last`` (the
    last evaluation) and ``best`` (each model's best top-1; mIoU for segmentation). A non-finite loss raises
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

        # Where the run goes, and what it resumes, is settled before the data and models are built:
        # a refused resume or an unwritable folder is reported at once, not after minutes of set-up.
        self.run_dir = self._resolve_run_dir()
        try:
            self._build()
        except BaseException:
            self._discard_empty_run_dir()
            raise
        self.log = RunLog(self.run_dir, tensorboard=t.tensorboard, enabled=self.dist.is_main)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))

    # ------------------------------------------------------------------ set-up

    def _build(self) -> None:
        """The loaders, models, method, optimizer, schedule, EMAs and the joint step."""
        cfg = self.cfg
        t = cfg.train
        seed_everything(t.seed)
        self.num_classes = num_classes_of(cfg)
        self.metric = PRIMARY_METRICS[cfg.data.task]  # what ranks the models: top1 or miou
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
        options = run_method_options(cfg)
        base_name = cfg.method.name.split("+")[0]
        if base_name in ("pat", "ofa"):  # built for the training images' side unless the config says
            own = options.setdefault(base_name, {})
            if own.get("img_size") is None:
                own["img_size"] = self.train_loader.resolution(0)
        self.method = build_method(
            cfg.method.name, list(self.models), roles=self.roles, num_classes=self.num_classes,
            num_samples=self.train_loader.dataset_size, task=cfg.data.task, **options,
        ).to(self.device)
        counts = self.method.parameter_counts()
        if counts and self.show_progress:
            self._say_plain(f"{cfg.method.name} trains its own {sum(counts.values()):,} parameters: "
                            + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        self.trainable = tuple(self.method.trainable)
        for i, (spec, trainable) in enumerate(zip(cfg.models, self.trainable)):
            if not trainable:
                if not spec.checkpoint:
                    raise ValueError(
                        f"method {cfg.method.name} keeps models.{i} ({spec.name}, {spec.role}) frozen: give "
                        f"models.{i}.checkpoint (train one with `kdengine train method.name=vanilla`)"
                    )
                self.models[i].requires_grad_(False)
        if t.sync_bn and self.dist.enabled and not self.is_cuda:  # torch's SyncBatchNorm runs on GPUs only
            raise ConfigError(f"train.sync_bn=true needs CUDA (torch's SyncBatchNorm), this run is on {self.device}; "
                              "set train.sync_bn=false")
        if t.sync_bn and self.dist.enabled:  # the statistics of the whole global batch (segmentation recipes)
            for i, trainable in enumerate(self.trainable):
                if trainable:
                    self.models[i] = nn.SyncBatchNorm.convert_sync_batchnorm(self.models[i])
        self.forward_models = [self._wrap_ddp(m) if tr else m for m, tr in zip(self.models, self.trainable)]

        self.optimizer = build_optimizer(cfg.optim, self.models, [m.lr for m in cfg.models], self.trainable,
                                         self.method, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(  # per group: warmup_lr and min_lr are absolute
            self.optimizer, [lr_lambda(cfg.optim, self.steps_per_epoch, t.epochs, g["initial_lr"])
                             for g in self.optimizer.param_groups]
        )
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: dict[str, float] = {}
        self.meter = DeviceMeter(self.device)
        # an EMA of each trained student, evaluated and reported as "<tag>_ema" beside it
        averaged = [i for i, (role, tr) in enumerate(zip(self.roles, self.trainable)) if role == "student" and tr]
        averaged = averaged if t.ema_decay is not None else []
        self.emas = [ModelEma(self.models[i], t.ema_decay) for i in averaged]
        self.ema_tags = [f"{self.tags[i]}_ema" for i in averaged]
        self.mix = self._batch_mix()
        self.step = JointStep(self.models, self.method, self.optimizer, self.precision, self.tags,
                              forward_models=self.forward_models, dist=self.dist,
                              cuda_graph=t.cuda_graph and not self.dist.enabled, clip_grad=cfg.optim.clip_grad,
                              emas=self.emas, mix=self.mix, ignore_index=cfg.data.ignore_index)
        self._check_loader_augmentations()
        self._stop_requested = False


    def _discard_empty_run_dir(self) -> None:
        """Remove the run directory this set-up created when it failed before writing anything, so
        the next run with the same name is not numbered past an empty folder."""
        if self.dist.is_main and self._created_run_dir:
            try:
                self.run_dir.rmdir()  # only when empty
            except OSError:
                pass

    def _batch_mix(self) -> Optional[BatchMix]:
        """Mixup / cutmix / label smoothing of the training batches (soft targets), or None."""
        d, t = self.cfg.data, self.cfg.train
        wanted = [f"{key}={value}" for key, value in (("data.mixup", d.mixup), ("data.cutmix", d.cutmix),
                                                      ("train.label_smoothing", t.label_smoothing)) if value]
        if not wanted:
            return None
        if not getattr(self.method, "soft_targets", False):
            raise ConfigError(f"{', '.join(wanted)} train on soft targets [B, classes], which method "
                              f"{self.cfg.method.name} does not take (it needs class labels)")
        return BatchMix(self.num_classes, mixup=d.mixup, cutmix=d.cutmix, mix_prob=d.mix_prob,
                        switch_prob=d.switch_prob, label_smoothing=t.label_smoothing, seed=t.seed,
                        rank=self.dist.rank)

    def _check_loader_augmentations(self) -> None:
        """The augmentation options are applied by the loader the run reads with, or the run stops
        (rather than train without them): ``resize`` is the device-resident loader's alone."""
        d = self.cfg.data
        asked = [("data.randaugment", d.randaugment, self.train_loader, "randaugment"),
                 ("data.random_erasing", d.random_erasing, self.train_loader, "random_erasing")]
        if d.pipeline == "cifar" and d.resolution is not None:
            asked += [("data.resolution", d.resolution, loader, "resize")
                      for loader in (self.train_loader, self.val_loader)]
        for key, value, loader, option in asked:
            if value and getattr(loader.config, option, None) != value:
                raise ConfigError(f"{key}={value} is not applied by the {type(loader).__name__} this run reads "
                                  f"with; it needs the device-resident loader (data.device_resident=true)")

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return model
        ids = [self.device.index] if self.is_cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _resolve_run_dir(self) -> Path:
        """The run directory (created, and checked writable, by the main process), and
        ``self.resume_from``: the checkpoint to continue, or None."""
        run_dir = self._locate_run()
        self._created_run_dir = not run_dir.exists()
        if self.dist.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=run_dir).close()
            except OSError as exc:
                raise ConfigError(f"train.output_dir={self.cfg.train.output_dir}: cannot write the run directory "
                                  f"{run_dir} ({exc.strerror}); choose a writable train.output_dir") from None
        return run_dir

    def _locate_run(self) -> Path:
        """The run directory, and ``self.resume_from``: the checkpoint to continue, or None.

        A new run never writes into a directory holding a checkpoint (a default name is numbered
        ``<name>-2``, ``-3``, ...); ``train.resume`` continues a stopped run, never a finished one,
        whose record stays as it ended. Raises ConfigError (naming the runs it found) when
        ``train.resume`` cannot tell which run to continue or finds none to.
        """
        t = self.cfg.train
        base = Path(t.output_dir)
        name = t.run_name or default_run_name(self.cfg)
        self.resume_from: Optional[Path] = None
        if t.resume in RESUME_AUTO:
            run_dir = self._stopped_run(base, name)
            if run_dir is not None:
                self.resume_from = run_dir / ckpt.LAST
                return run_dir
        elif t.resume:
            path = Path(t.resume)
            path = path / ckpt.LAST if path.is_dir() else path  # a run directory names its checkpoint
            if not path.is_file():
                raise FileNotFoundError(f"train.resume={t.resume}: no such checkpoint or run directory (the "
                                        f"choices: auto, auto-or-new, a checkpoint path or a run directory)")
            at = ckpt.position(path)
            if at["epoch"] >= at["epochs"]:
                raise ConfigError(f"train.resume={t.resume}: that run finished all {at['epochs']} epochs; nothing "
                                  f"to continue (start a new run; its weights load with models.N.checkpoint={path})")
            self.resume_from = path
            return path.parent
        run_dir = base / name
        if t.run_name is None and run_dir.exists():
            n = 2  # a new run never overwrites an earlier one
            while (base / f"{name}-{n}").exists():
                n += 1
            run_dir = base / f"{name}-{n}"
        elif ckpt.find_last(run_dir):
            at = ckpt.position(run_dir / ckpt.LAST)
            if at["epoch"] >= at["epochs"]:
                raise FileExistsError(f"run directory {run_dir} holds a finished run; choose another train.run_name")
            raise FileExistsError(
                f"run directory {run_dir} holds a stopped run ({_where(at)}); continue it with train.resume=auto "
                f"or choose another train.run_name"
            )
        return run_dir

    def _stopped_run(self, base: Path, name: str) -> Optional[Path]:
        """For ``train.resume=auto``: the one stopped run of this name (``train.run_name``, else the
        default name and its numbered ``<name>-N``), or None when there is none and
        ``auto-or-new`` allows a new run. Raises ConfigError when several match or, for ``auto``,
        none does."""
        t = self.cfg.train
        if t.run_name:
            dirs = [base / name]
        else:
            pattern = re.compile(re.escape(name) + r"(-\d+)?")
            dirs = sorted((d for d in base.glob(f"{glob.escape(name)}*") if pattern.fullmatch(d.name)),
                          key=lambda d: int(d.name[len(name) + 1:] or 1))
        stopped, finished = [], []
        for run_dir in dirs:
            if ckpt.find_last(run_dir):
                at = ckpt.position(run_dir / ckpt.LAST)
                (finished if at["epoch"] >= at["epochs"] else stopped).append((run_dir, at))
        if len(stopped) == 1:
            return stopped[0][0]
        if stopped:
            listed = "; ".join(f"{d} ({_where(at)})" for d, at in stopped)
            raise ConfigError(f"train.resume={t.resume}: {len(stopped)} stopped runs match, {listed}; "
                              f"name the one to continue with train.run_name=<its directory name>")
        if t.resume == "auto-or-new":
            return None
        if finished:
            found = "; ".join(f"{d} finished all {at['epochs']} epochs" for d, at in finished)
        elif t.run_name:
            found = f"{base / name} holds no checkpoint"
        else:
            found = f"no run {name} or {name}-N under {base} holds a checkpoint"
        raise ConfigError(f"train.resume={t.resume}: nothing to resume ({found}); start a new run without "
                          f"train.resume, or use train.resume=auto-or-new to start one when there is none")

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
            "ema": [ema.state_dict() for ema in self.emas],
        }

    def save_checkpoint(self) -> Optional[Path]:
        if not self.dist.is_main:
            return None
        return ckpt.save_atomic(self.state_dict(), self.run_dir / ckpt.LAST)

    def _load_checkpoint(self, path: Path) -> None:
        state = ckpt.load(path, map_location=self.device)  # the RNG states stay on the CPU
        changed = self._check_resume_config(path, state["config"])
        if len(state["models"]) != len(self.models):
            raise ValueError(f"checkpoint {path} holds {len(state['models'])} models, this run has {len(self.models)}")
        for model, weights in zip(self.models, state["models"]):
            model.load_state_dict(weights)
        if len(state.get("ema", [])) != len(self.emas):
            raise ConfigError(f"train.resume: {path} holds {len(state.get('ema', []))} EMA model(s), this run has "
                              f"{len(self.emas)} (train.ema_decay must be as in the run that saved it)")
        for ema, weights in zip(self.emas, state.get("ema", [])):
            ema.load_state_dict(weights)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best = state["global_step"], dict(state["best"])
        self.meter.sums = {k: v.to(self.device) for k, v in state["meter"]["sums"].items()}
        self.meter.count = state["meter"]["count"].to(self.device)
        self.log.truncate_after(self.epoch)
        said = ", ".join(f"{key} {_text(a)} -> {_text(b)}" for key, a, b in changed)
        self._say_plain(f"resuming {self.run_dir} in epoch {self.epoch + 1}/{self.cfg.train.epochs} at step "
                  f"{self.step_in_epoch} of {self.steps_per_epoch}" + (f"; changed since its checkpoint: {said}"
                                                                      if said else ""))

    def _check_resume_config(self, path: Path, saved: dict) -> list[tuple[str, Any, Any]]:
        """A checkpoint continues the run that saved it: other models or another method is an
        error naming what differs. Returns the other settings that differ (epochs, logging, ...),
        which the resumed run takes from the current configuration."""
        changed = [d for d in config_differences(saved, self.cfg) if d[0] not in _RUN_LOCATION]
        other_run = [d for d in changed if _defines_the_run(d[0])]
        if other_run:
            said = "; ".join(f"{key}={_text(a)} there, {_text(b)} here" for key, a, b in other_run)
            raise ConfigError(f"train.resume: {path} was saved by another set-up ({said}); continue it with "
                              f"its own settings (its config.yaml) or start a new run")
        return changed

    # ------------------------------------------------------------------ the step

    def train_step(self, images, labels, indices=None) -> dict[str, torch.Tensor]:
        """One joint step (:class:`~.step.JointStep`; captured on CUDA); on-device metrics."""
        return self.step(images, labels, indices, step=self.global_step)  # the step seeds its mixup draws

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, loader=None) -> dict[str, float]:
        """Every model's and their ensemble's validation metrics: top-1, top-5, loss and ECE, or for
        segmentation mIoU, pixel accuracy, loss and per-class IoU (:mod:`.evaluate`)."""
        result = evaluate_run_models(self.cfg, self.models, self.tags, loader or self.val_loader, self.device,
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
            self.request_stop("Ctrl-C")
            self._say("[yellow]Ctrl-C: saving a checkpoint after this step (again to abort)[/]")

        signal.signal(signal.SIGINT, handler)
        return previous

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop after the current step with a checkpoint, as Ctrl-C does (e.g. from another
        thread, where no SIGINT handler is installed); ``fit`` then returns ``"interrupted"``.

        Args:
            reason: what asked for the stop, as the stop message names it.
        """
        self._stop_reason = reason
        self._stop_requested = True

    def resume_hint(self, status: RunStatus) -> str:
        """How to continue this run after it stopped with ``status``, as the stop message says it:
        the settings to give besides the run's own. A front end may replace this method on the
        instance with its own wording (``kdengine train`` gives its command line).

        Args:
            status: why the run stopped.

        Returns:
            One line.
        """
        settings = f"train.resume=auto train.run_name={self.run_dir.name}"
        if self.run_dir.parent != Path(self.cfg.train.output_dir):
            settings += f" train.output_dir={self.run_dir.parent}"
        if status is RunStatus.MAX_STEPS:
            settings += " train.max_steps=null"
        return f"the same settings and {settings}"

    def _say(self, text: str) -> None:
        if not self.dist.is_main:
            return
        if self.console is not None:
            self.console.print(text)
        else:
            from rich.text import Text

            print(Text.from_markup(text).plain)

    def _say_plain(self, text: str) -> None:
        """``_say`` of a text with paths and values in it, which are not rich markup."""
        from rich.markup import escape

        self._say(escape(text))

    def _check_finite(self, values: dict[str, float]) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            where = f"epoch {self.epoch + 1}/{self.cfg.train.epochs}, step {self.global_step}"
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
        """A live bar on a terminal; off one (a pipe, a job's log file) a line every
        ``train.log_every`` steps, which a live bar would not leave until the run ends."""
        if not (self.show_progress and self.dist.is_main):
            return _NoProgress()
        from rich.console import Console

        console = self.console or Console()
        if not console.is_terminal:
            return _LineProgress(self.console)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        # Fixed widths for all but the running losses, which take the rest and are cut with an
        # ellipsis: rich would otherwise squeeze the epoch and the counts first.
        epochs, total = self.cfg.train.epochs, self.cfg.train.epochs * self.steps_per_epoch
        fixed = {"epoch": len(f"epoch {epochs}/{epochs}"), "bar": 10 if console.width < 120 else 30,
                 "count": 2 * len(str(total)) + 1, "times": 2 * 7}
        info_width = max(12, console.width - sum(fixed.values()) - 5)  # 5: the spaces between 6 columns
        return Progress(TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True,
                                                                                   min_width=fixed["epoch"])),
                        BarColumn(bar_width=fixed["bar"]), MofNCompleteColumn(table_column=Column(no_wrap=True)),
                        TimeElapsedColumn(table_column=Column(no_wrap=True)),
                        TimeRemainingColumn(table_column=Column(no_wrap=True)),
                        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                              max_width=info_width)),
                        console=console, transient=False)

    def _train_loop(self, progress, task) -> Optional[RunStatus]:
        """The current epoch's steps from ``step_in_epoch`` on. Returns the run's status when it
        stops inside the epoch (with a checkpoint), None when the epoch's steps are done."""
        t = self.cfg.train
        self.method.start_epoch(self.epoch, t.epochs)
        for model, trainable in zip(self.models, self.trainable):
            model.train(trainable)
        self.train_loader.set_epoch(self.epoch, start_batch=self.step_in_epoch)
        self._epoch_started = time.perf_counter()  # a resumed epoch times its remaining steps
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
            if stop is not None:
                self._say_plain(self._stop_message(stop))
                return stop
        return None

    def _log_running(self, progress, task, rate: float) -> None:
        """One host sync every ``log_every`` steps: the running means, checked, on the progress bar."""
        running = self.meter.read()
        self._check_finite({k: v for k, v in running.items() if not _is_accuracy(k)})
        if progress:  # the loss first: on a narrow terminal the bar cuts the terms after it
            info = f"{rate:,.0f} img/s  loss {running.get('loss', float('nan')):.3f}  " + "  ".join(
                f"{k} {v:.3f}" for k, v in running.items() if k != "loss" and not _is_accuracy(k))
            progress.update(task, completed=self.global_step, info=info,
                            step=f"step {self.step_in_epoch}/{self.steps_per_epoch}")

    def _stop_message(self, status: RunStatus) -> str:
        """What stopped the run, where (1-based epochs), the checkpoint, and how to continue."""
        reason = (f"train.max_steps={self.cfg.train.max_steps} reached" if status is RunStatus.MAX_STEPS
                  else getattr(self, "_stop_reason", "stop requested"))
        return (f"{reason}: stopped in epoch {self.epoch + 1}/{self.cfg.train.epochs} after step "
                f"{self.step_in_epoch} of {self.steps_per_epoch}; saved {self.run_dir / ckpt.LAST}. "
                f"Continue with {self.resume_hint(status)}")

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

    def _evaluate_emas(self) -> dict[str, float]:
        """Top-1, top-5 and loss of each EMA model (``<tag>_ema/...``); not part of the ensemble."""
        if not self.emas:
            return {}
        result = evaluate_run_models(self.cfg, [ema.module for ema in self.emas], self.ema_tags, self.val_loader,
                                     self.device, self.step.autocast, self.dist)
        return {k: v for k, v in result.items() if not k.startswith("ensemble/")}

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
        self.dist.broadcast_buffers(list(self.models) + [ema.module for ema in self.emas] + norms)
        train_seconds = time.perf_counter() - getattr(self, "_epoch_started", time.perf_counter())
        eval_started = time.perf_counter()
        val = self.evaluate()
        val.update(self._evaluate_emas())
        eval_seconds = time.perf_counter() - eval_started
        for tag in self.tags + ["ensemble"] + self.ema_tags:  # each its own best, never the best of two
            self.best[tag] = max(self.best.get(tag, float("-inf")), val[f"{tag}/{self.metric}"])
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.write({"epoch": epoch, "split": "train", "step": self.global_step, "lr": float(lr),
                        "epoch_s": round(train_seconds, 3),
                        **{k: (100 * v if _is_accuracy(k) else v) for k, v in train_metrics.items()}},
                       step=self.global_step)
        self.log.write({"epoch": epoch, "split": "val", "step": self.global_step, "eval_s": round(eval_seconds, 3),
                        **val}, step=self.global_step)
        self.epoch += 1
        self.step_in_epoch = 0
        self.save_checkpoint()
        if self.cfg.train.keep_checkpoints and self.dist.is_main:  # kdengine viz: the maps of every epoch
            shutil.copyfile(self.run_dir / ckpt.LAST, self.run_dir / ckpt.epoch_checkpoint_name(self.epoch))
        if self.dist.is_main:
            from ..viz.curves import plot_curves

            plot_curves(self.log.records(), self.run_dir / "curves.png")
        if progress:
            summary = "  ".join(f"{tag} {val[f'{tag}/{self.metric}']:.2f}"
                                for tag in self.tags + ["ensemble"] + self.ema_tags)
            what = "top-1" if self.metric == "top1" else self.metric
            progress.console.print(f"epoch {epoch + 1}/{self.cfg.train.epochs}  val {what}: {summary}")


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


class _LineProgress:
    """The progress of a run off a terminal: one line per running-loss update (every
    ``train.log_every`` steps), never cut at the console's width; the epochs' summary lines go
    through ``console`` too. The calls are those of a rich ``Progress``."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(soft_wrap=True)
        self._fields: dict[str, Any] = {}
        self._start = time.perf_counter()

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        return False

    def __bool__(self):
        return True

    def add_task(self, description: str, **fields) -> int:
        self._fields = {"description": description, **fields}
        return 0

    def update(self, task, **fields) -> None:
        self._fields.update(fields)
        if "info" in fields:
            elapsed = int(time.perf_counter() - self._start)
            f = self._fields
            self.console.print(f"{f['description']}  {f.get('step', '')}  {f['info']}  "
                               f"[{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}]",
                               soft_wrap=True, markup=False, highlight=False)
