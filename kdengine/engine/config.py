"""Experiment configuration: typed defaults (OmegaConf structured configs), one YAML per
experiment under ``configs/``, dotted command-line overrides, and validation that names the
valid keys or values.

``ExperimentConfig()`` itself is the embedded default that ``kdengine train`` runs without
arguments; ``configs/embedded/default.yaml`` spells it out (a test keeps the two equal).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ..data import ORDERS
from ..methods import ROLES, list_methods
from ..models import list_models

DATASETS = ("embedded", "beton")
#: ``data.pipeline``: the recipe whose loader pipelines ``<recipe>_train`` and ``<recipe>_val``
#: (see :func:`kdengine.data.make_loader`) a run trains and validates with.
DATA_RECIPES = ("cifar", "imagenet")
SCHEDULES = ("multistep", "step", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A configuration problem, worded with the settings' dotted names (a front end adds its own
    spelling, e.g. the CLI's flags)."""


@dataclass
class ModelConfig:
    name: str = "resnet8"
    role: str = "student"  # teacher | student
    # Extra constructor arguments of the zoo model (e.g. {width_mult: 0.5}).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Pretrained weights: a kdengine checkpoint (its model with the same index, or `checkpoint_model`)
    # or a plain state dict (e.g. torchvision's). Offline teachers must have one.
    checkpoint: Optional[str] = None
    checkpoint_model: Optional[int] = None
    lr: Optional[float] = None  # this model's learning rate when it differs (paper: 0.01 for MobileNetV2)


@dataclass
class EmbeddedDataConfig:
    # The default run's subset: 16-px images, 2,000 per class for training, 500 for validation
    # (the generator's own defaults are 32 px, 5,000 / 1,000), sized for 2 CPU cores.
    size: int = 16
    num_classes: int = 10
    train_per_class: int = 2000
    val_per_class: int = 500
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "embedded"  # embedded | beton
    embedded: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)
    train_path: Optional[str] = None  # .beton files for dataset=beton
    val_path: Optional[str] = None
    num_classes: Optional[int] = None  # dataset=beton: required; embedded: from `embedded`
    pipeline: str = "cifar"  # cifar (pad-crop + flip) | imagenet (RandomResizedCrop + flip)
    resolution: int = 224  # imagenet pipeline: training crop and validation output size
    crop_padding: Optional[int] = None  # cifar pipeline's pad-and-crop shift; default: image size / 8
    batch_size: int = 128  # per process
    val_batch_size: Optional[int] = None  # default: 2 x batch_size
    num_workers: int = 2
    order: str = "random"
    os_cache: bool = True
    device_resident: Any = "auto"  # true | false | auto (small sets held whole on the device)
    mean: Optional[list[float]] = None  # per channel, 0..255; default: the dataset's stats
    std: Optional[list[float]] = None


@dataclass
class MethodConfig:
    name: str = "dml+adm"
    # Method hyper-parameters (see `kdengine.methods.build_method`), e.g. {adm: {alpha: 0.01}}.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # multistep | step | cosine | constant
    milestones: list[int] = field(default_factory=list)  # multistep, in epochs
    step_size: int = 30  # step, in epochs
    gamma: float = 0.1  # multistep / step factor
    warmup_epochs: float = 0.0  # linear warm-up from 0, in (fractional) epochs


@dataclass
class TrainConfig:
    epochs: int = 6
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    channels_last: Optional[bool] = None  # default: on CUDA
    cuda_graph: bool = True  # capture the joint step on CUDA (eager elsewhere)
    threads: Optional[int] = None  # CPU intra-op threads (default: torch's)
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this many steps in all
    log_every: int = 20  # steps between host syncs: progress bar, non-finite check
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: each epoch's end only)
    output_dir: str = "runs"
    run_name: Optional[str] = None  # default: <method>_<models>_seed<seed>
    resume: Optional[str] = None  # null | auto | path to a checkpoint
    tensorboard: bool = True  # when the tensorboard package is installed
    deterministic: bool = True  # torch.use_deterministic_algorithms on CPU


@dataclass
class ExperimentConfig:
    """What one `kdengine train` run does. Defaults: the embedded default experiment."""

    models: list[ModelConfig] = field(
        default_factory=lambda: [ModelConfig(name="wrn_16_2", role="teacher"),
                                 ModelConfig(name="resnet8", role="student")]
    )
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""


# ---------------------------------------------------------------------------------------------


def _valid_keys(node) -> list[str]:
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _parent_of(cfg, dotted: str):
    node = cfg
    for part in dotted.split(".")[:-1]:
        node = node[int(part)] if isinstance(node, ListConfig) else node[part]
    return node


def _key_error(cfg, dotted: str, where: str) -> ConfigError:
    try:
        parent = _parent_of(cfg, dotted)
    except (KeyError, IndexError, ValueError, OmegaConfBaseException):
        parent = cfg
    valid = _valid_keys(parent)
    leaf = dotted.split(".")[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {dotted!r}{hint}; valid keys here: {', '.join(valid)}")


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=0.1"`` -> ``("optim.lr", 0.1)``; the value is read as YAML (numbers, lists,
    null, booleans), so ``models.0.kwargs={width_mult: 0.5}`` works too."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=5)")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    try:
        return key, yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None


def _merge_file(cfg, path: str):
    where = f"config file {path}"
    if not os.path.exists(path):
        raise ConfigError(f"{where}: no such file")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    try:
        return OmegaConf.merge(cfg, OmegaConf.create(data))
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise _key_error(cfg, str(exc.full_key), where) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {exc.full_key}: {exc.msg}") from None


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the YAML file (if any), then the dotted overrides; validated."""
    cfg = OmegaConf.structured(ExperimentConfig)
    if path:
        cfg = _merge_file(cfg, path)
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply ``key=value`` items (dotted keys; list items by index: ``models.1.name=resnet8``)."""
    for item in overrides:
        key, value = parse_override(item)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except (ConfigKeyError, ConfigAttributeError, KeyError, IndexError):
            raise _key_error(cfg, key, f"override {item!r}") from None
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: {exc.msg}") from None
    return cfg


def _choice(value, valid, key):
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _positive(value, key, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: DictConfig) -> None:
    """Checks beyond types: choices, ranges, and what the method and models need."""
    if len(cfg.models) == 0:
        raise ConfigError("models: give at least one model")
    for i, m in enumerate(cfg.models):
        _choice(m.role, ROLES, f"models.{i}.role")
        if m.name not in list_models():
            raise ConfigError(f"models.{i}.name={m.name!r} is not a zoo model; available: "
                              f"{', '.join(list_models())}")
        _positive(m.lr, f"models.{i}.lr")
    _choice(cfg.method.name, list_methods(), "method.name")
    d = cfg.data
    _choice(d.dataset, DATASETS, "data.dataset")
    _choice(d.pipeline, DATA_RECIPES, "data.pipeline")
    _choice(d.order, ORDERS, "data.order")
    _choice(d.device_resident, (True, False, "auto"), "data.device_resident")
    for key in ("batch_size", "resolution", "val_batch_size"):
        _positive(d[key], f"data.{key}")
    _positive(d.crop_padding, "data.crop_padding", allow_zero=True)
    _positive(d.num_workers, "data.num_workers")  # FFCV needs at least one
    if d.dataset == "beton":
        for key in ("train_path", "val_path", "num_classes"):
            if d[key] is None:
                raise ConfigError(f"data.dataset=beton needs data.{key}")
    for key in ("mean", "std"):
        if d[key] is not None and len(d[key]) != 3:
            raise ConfigError(f"data.{key} must list 3 per-channel values, got {list(d[key])}")
    e = d.embedded
    for key in ("size", "num_classes", "train_per_class", "val_per_class"):
        _positive(e[key], f"data.embedded.{key}")
    o = cfg.optim
    _choice(o.schedule, SCHEDULES, "optim.schedule")
    _positive(o.lr, "optim.lr")
    _positive(o.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(o.warmup_epochs, "optim.warmup_epochs", allow_zero=True)
    if o.schedule == "multistep" and not o.milestones:
        raise ConfigError("optim.schedule=multistep needs optim.milestones (epochs), e.g. [150, 225]")
    t = cfg.train
    _positive(t.epochs, "train.epochs")
    _positive(t.max_steps, "train.max_steps")
    _positive(t.log_every, "train.log_every")
    _positive(t.checkpoint_every, "train.checkpoint_every", allow_zero=True)
    _positive(t.threads, "train.threads")
    _choice(t.precision, PRECISIONS, "train.precision")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device={t.device!r} is not valid; choose auto, cpu, cuda or cuda:N")


def num_classes_of(cfg: DictConfig) -> int:
    return cfg.data.embedded.num_classes if cfg.data.dataset == "embedded" else cfg.data.num_classes


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
