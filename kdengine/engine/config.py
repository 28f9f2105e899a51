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

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ..data import CLASSES, INTERPOLATIONS, ORDERS
from ..data.augment import parse_rand_augment
from ..data.cityscapes import CITYSCAPES_CLASSES
from ..methods import ROLES, list_methods
from ..models import SEGMENTATION_MODELS, list_models

DATASETS = ("embedded", "beton")
#: ``data.task``: image classification (labels [B]) or semantic segmentation (label maps [B, H, W]).
TASKS = ("classification", "segmentation")
#: ``data.pipeline``: the recipe whose loader pipelines ``<recipe>_train`` and ``<recipe>_val``
#: (see :func:`kdengine.data.make_loader`) a run trains and validates with.
DATA_RECIPES = ("cifar", "imagenet")
SCHEDULES = ("multistep", "step", "cosine", "poly", "constant")
OPTIMIZERS = ("sgd", "adamw")
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
    # classification | segmentation. Segmentation on the embedded dataset: each image's label map
    # is its class + 1 on the object's pixels (the generator's foreground mask) and 0 (background)
    # elsewhere, so data.embedded.num_classes + 1 classes; on .beton files: `kdengine data write
    # cityscapes` (19 classes, 255 ignored). Validation is on whole images; metrics: mIoU.
    task: str = "classification"
    dataset: str = "embedded"  # embedded | beton
    embedded: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)
    train_path: Optional[str] = None  # .beton files for dataset=beton
    val_path: Optional[str] = None
    num_classes: Optional[int] = None  # dataset=beton: required; embedded: from `embedded`
    pipeline: str = "cifar"  # cifar (pad-crop + flip) | imagenet (RandomResizedCrop + flip)
    # The side of the images the models see. imagenet pipeline: the training crop and validation
    # output size (null: 224). cifar pipeline: the crops resized to it, bilinear, e.g. CIFAR's 32 px
    # to 224 as the PAT/OFA recipes train (null: the stored size; device-resident loader only).
    resolution: Optional[int] = None
    crop_padding: Optional[int] = None  # cifar pipeline's pad-and-crop shift; default: image size / 8
    batch_size: int = 128  # per process
    val_batch_size: Optional[int] = None  # default: 2 x batch_size
    num_workers: int = 2
    order: str = "random"
    os_cache: bool = True
    device_resident: Any = "auto"  # true | false | auto (small sets held whole on the device)
    mean: Optional[list[float]] = None  # per channel, 0..255; default: the dataset's stats
    std: Optional[list[float]] = None
    # Training augmentations on the device (both loaders), in timm's order after the crop and flip:
    # RandAugment as timm's string (e.g. rand-m9-mstd0.5-inc1, the PAT/OFA ViT recipes; null: off),
    # then normalisation, then random erasing with this probability per image (timm's
    # RandomErasing, pixel mode; 0.25 in those recipes).
    randaugment: Optional[str] = None
    random_erasing: float = 0.0
    # imagenet pipeline: the validation centre crop's share of the shorter side (timm's crop_pct;
    # null: 0.875 = 224/256; timm's 0.9 of the DeiT-T and Swin students crops 224 of 248 px, a
    # share of 224 / 248), and the training crop's resampling: bilinear, bicubic or random (one of
    # the two per image, as timm's RandomResizedCropAndInterpolation with interpolation=random;
    # the device-resident loader only: FFCV's decoder resamples with OpenCV's area filter).
    val_crop_pct: Optional[float] = None
    train_interpolation: str = "bilinear"
    # Mixup / cutmix of each training batch on the device (timm's Mixup, one lam per batch); every
    # model sees the mixed images and the targets become soft [B, classes] (the method must take
    # them). mixup / cutmix: Beta(alpha, alpha) parameter, 0: off (recipes: 0.8 / 1.0); mix_prob:
    # probability of mixing a batch; switch_prob: of cutmix rather than mixup when both are on.
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    # Segmentation training augmentation (data.task=segmentation), batched on the device: a random
    # scale in scale_range, a crop_size [h, w] crop (padded with the mean colour, labels with
    # ignore_index), a horizontal flip. crop_size null: the stored image size (the embedded set).
    crop_size: Optional[list[int]] = None
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    ignore_index: int = 255


@dataclass
class MethodConfig:
    name: str = "dml+adm"
    # Method hyper-parameters (see `kdengine.methods.build_method`), e.g. {adm: {alpha: 0.01}}.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw (torch's AdamW, betas 0.9 / 0.999)
    lr: float = 0.05
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 5e-4
    # Weight decay on biases and 1-D parameters (norm scales) too; null: false for adamw (as timm),
    # true for sgd (timm's recipes exclude them for sgd as well: set false).
    decay_1d: Optional[bool] = None
    clip_grad: Optional[float] = None  # clip the gradients to this total L2 norm over every trained parameter
    schedule: str = "cosine"  # multistep | step | cosine | poly | constant
    milestones: list[int] = field(default_factory=list)  # multistep, in epochs
    step_size: int = 30  # step, in epochs
    gamma: float = 0.1  # multistep / step factor
    min_lr: float = 0.0  # cosine: the rate it ends at
    power: float = 0.9  # poly: (1 - step / steps) ** power, per step (the segmentation recipes)
    # timm's per-epoch scheduler (t_in_epochs, the PAT/OFA recipes): the rate changes at each
    # epoch's start and the warm-up is timm's per-epoch ramp; false: per step (see schedule.py)
    per_epoch: bool = False
    warmup_epochs: float = 0.0  # linear warm-up (per step) from warmup_lr, in (fractional) epochs
    warmup_lr: float = 0.0


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
    log_every: int = 20  # steps between host syncs: progress bar (a log line off a terminal), non-finite check
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: each epoch's end only)
    keep_checkpoints: bool = False  # also keep checkpoint-epoch<NNN>.pt after each epoch (kdengine viz: IoU per epoch)
    output_dir: str = "runs"
    run_name: Optional[str] = None  # default: <method>_<models>_seed<seed>
    # null: a new run | auto: continue the stopped run (an error when there is none) | auto-or-new:
    # continue it if there is one, else start a new run (job scripts that may be requeued) | a checkpoint path
    resume: Optional[str] = None
    tensorboard: bool = True  # when the tensorboard package is installed
    deterministic: bool = True  # torch.use_deterministic_algorithms on CPU
    # Under DDP on CUDA, the trained models' BatchNorm layers synchronised across processes
    # (SyncBatchNorm), as the segmentation recipes train (a few crops per GPU); off by default and
    # on one process; refused under DDP on the CPU (torch's SyncBatchNorm needs a GPU).
    sync_bn: bool = False
    # Cross-entropy against (1 - e) one-hot + e / classes (folded into the mixup targets when
    # data.mixup / cutmix are on): soft targets, which the method must take.
    label_smoothing: float = 0.0
    # An exponential moving average of each student's weights (timm's ModelEmaV2, e.g. 0.9998),
    # updated after every step, evaluated each epoch beside the student as "<tag>_ema"; null: off.
    ema_decay: Optional[float] = None


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


_TYPE_PROBLEMS = (  # OmegaConf's wording of a value of the wrong type -> what the setting takes
    ("converted to Integer", "must be an integer"),
    ("converted to Float", "must be a number"),
    ("is not a valid bool", "must be true or false"),
    ("is not a ListConfig", "must be a list, e.g. [1, 2]"),
    ("is not a subclass of", "is a section: set its keys (e.g. train.epochs=3), not the section"),
)


def _value_error(exc: OmegaConfBaseException, where: str, given: Optional[tuple[str, Any]] = None) -> ConfigError:
    """A wrongly typed value as one line naming the setting, without OmegaConf's internals.

    Args:
        exc: OmegaConf's error.
        where: what set the value (an override, a config file).
        given: ``(key, value)`` of an override, to quote the value when the error is about that key.

    Returns:
        The error to raise.
    """
    text = str(exc.msg).splitlines()[0] if exc.msg else type(exc).__name__
    key = str(exc.full_key) if exc.full_key else ""
    problem = next((p for needle, p in _TYPE_PROBLEMS if needle in text), None)
    if problem is None:
        return ConfigError(f"{where}: {key + ': ' if key else ''}{text}")
    got = f", got {given[1]!r}" if given is not None and given[0] == key and "section" not in problem else ""
    return ConfigError(f"{where}: {key} {problem}{got}")


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
        raise _value_error(exc, where) from None


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
            raise _value_error(exc, f"override {item!r}", (key, value)) from None
    return cfg


def _choice(value, valid, key):
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _positive(value, key, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _probability(value, key, below_one=False):
    if not (0 <= value < 1 if below_one else 0 <= value <= 1):
        raise ConfigError(f"{key}={value} must be in [0, {'1)' if below_one else '1]'}")


def _check_recipe_options(cfg: DictConfig) -> None:
    """The optimizer, schedule, augmentation, label-smoothing and EMA options of the recipes."""
    o, d, t = cfg.optim, cfg.data, cfg.train
    _choice(o.name, OPTIMIZERS, "optim.name")
    _positive(o.clip_grad, "optim.clip_grad")
    _positive(o.warmup_lr, "optim.warmup_lr", allow_zero=True)
    _positive(o.min_lr, "optim.min_lr", allow_zero=True)
    _positive(o.power, "optim.power")
    if o.min_lr and o.schedule != "cosine":
        raise ConfigError(f"optim.min_lr is the end of the cosine schedule; optim.schedule={o.schedule} has none")
    if o.min_lr >= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be below optim.lr={o.lr}")
    for key in ("mixup", "cutmix"):
        _positive(d[key], f"data.{key}", allow_zero=True)
    for key in ("mix_prob", "switch_prob", "random_erasing"):
        _probability(d[key], f"data.{key}")
    _choice(d.train_interpolation, INTERPOLATIONS, "data.train_interpolation")
    if d.val_crop_pct is not None and not 0 < d.val_crop_pct <= 1:
        raise ConfigError(f"data.val_crop_pct={d.val_crop_pct} must be in (0, 1], e.g. 0.875 or 0.9")
    for key, value, default in (("val_crop_pct", d.val_crop_pct, None), ("train_interpolation",
                                                                         d.train_interpolation, "bilinear")):
        if value != default and d.pipeline != "imagenet":
            raise ConfigError(f"data.{key}={value} is an option of data.pipeline=imagenet (the RandomResizedCrop "
                              f"and centre-crop pipelines), not of data.pipeline={d.pipeline}")
    if d.randaugment is not None:
        try:
            parse_rand_augment(d.randaugment)
        except ValueError as exc:
            raise ConfigError(f"data.randaugment: {exc}") from None
    _probability(t.label_smoothing, "train.label_smoothing", below_one=True)
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in (0, 1), e.g. 0.9998 (or null: off)")


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
    _choice(d.task, TASKS, "data.task")
    _check_task(cfg)
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
    _check_recipe_options(cfg)
    t = cfg.train
    _positive(t.epochs, "train.epochs")
    _positive(t.max_steps, "train.max_steps")
    _positive(t.log_every, "train.log_every")
    _positive(t.checkpoint_every, "train.checkpoint_every", allow_zero=True)
    _positive(t.threads, "train.threads")
    _choice(t.precision, PRECISIONS, "train.precision")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device={t.device!r} is not valid; choose auto, cpu, cuda or cuda:N")
    _check_device_present(t.device)


def _check_task(cfg: DictConfig) -> None:
    """The models fit the task, and the segmentation options are sound."""
    d = cfg.data
    seg = d.task == "segmentation"
    for i, m in enumerate(cfg.models):
        if (m.name in SEGMENTATION_MODELS) != seg:
            want = "segmentation models: " + ", ".join(SEGMENTATION_MODELS) if seg else \
                "classification models (segmentation models need data.task=segmentation)"
            raise ConfigError(f"models.{i}.name={m.name} does not fit data.task={d.task}; use {want}")
    if not seg:
        return
    if d.crop_size is not None and (len(d.crop_size) != 2 or min(d.crop_size) < 1):
        raise ConfigError(f"data.crop_size must be [height, width] of positive ints, got {list(d.crop_size)}")
    if d.crop_size is None and d.dataset != "embedded":
        raise ConfigError("data.task=segmentation on .beton data needs data.crop_size [h, w] (Cityscapes: [512, 1024])")
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise ConfigError(f"data.scale_range must be [low, high] with 0 < low <= high, got {list(d.scale_range)}")
    if not 0 <= d.ignore_index <= 255:
        raise ConfigError(f"data.ignore_index={d.ignore_index} must be in [0, 255] (label maps are stored as uint8)")
    given = (cfg.method.options.get("seg") or {}).get("ignore_index")
    if given is not None and given != d.ignore_index:
        raise ConfigError(f"method.options.seg.ignore_index={given} differs from data.ignore_index={d.ignore_index}; "
                          "set data.ignore_index only (the method takes it from there)")
    for key, value in (("data.mixup", d.mixup), ("data.cutmix", d.cutmix), ("data.randaugment", d.randaugment),
                       ("data.random_erasing", d.random_erasing), ("train.label_smoothing", cfg.train.label_smoothing)):
        if value:
            raise ConfigError(f"{key}={value} is a classification option; data.task=segmentation does not take it")


def _check_device_present(device: str) -> None:
    """A CUDA ``train.device`` on a machine where torch sees no such GPU is a setting to fix, said
    before any data or model is set up."""
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"train.device={device} but this torch build sees no CUDA device; "
                          "use train.device=cpu (or auto)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= count):
        raise ConfigError(f"train.device={device} but torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def _flat(node, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> values; lists of sections by index (``models.1.name``), other lists whole."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out  # an empty section (method.options: {}) adds no key
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        out = {prefix[:-1]: len(node)}  # the number of sections (models) is a setting too
        for i, value in enumerate(node):
            out.update(_flat(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: node}


def config_differences(before, after) -> list[tuple[str, Any, Any]]:
    """The settings that differ between two configurations.

    Args:
        before: a configuration (a DictConfig or a plain dict, e.g. a checkpoint's); completed with
            the defaults first, so a setting added since it was saved counts as its default.
        after: another one.

    Returns:
        ``(dotted key, value in before, value in after)`` for each difference, in key order; a key
        missing on one side has the value None there.
    """
    flat = []
    for cfg in (before, after):
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(
            OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg))
        flat.append(_flat(OmegaConf.to_container(merged, resolve=True)))
    a, b = flat
    return [(key, a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys(), key=_natural)
            if a.get(key) != b.get(key)]


def _natural(key: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def num_classes_of(cfg: DictConfig) -> int:
    """The models' output classes: the embedded set's shape classes (plus the background for
    segmentation), or ``data.num_classes`` of .beton data."""
    if cfg.data.dataset == "embedded":
        return cfg.data.embedded.num_classes + (cfg.data.task == "segmentation")
    return cfg.data.num_classes


def class_names_of(cfg: DictConfig) -> Optional[list[str]]:
    """The names of the run's classes where the data has them: the embedded set's shapes (after
    ``background`` for segmentation), Cityscapes' 19 classes for segmentation .beton data with 19
    classes; else None."""
    seg = cfg.data.task == "segmentation"
    if cfg.data.dataset == "embedded":
        return (["background"] if seg else []) + list(CLASSES[: cfg.data.embedded.num_classes])
    if seg and cfg.data.num_classes == len(CITYSCAPES_CLASSES):
        return list(CITYSCAPES_CLASSES)
    return None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
