"""The joint training step of M models under a distillation method, and its optimizer.

:class:`JointStep` is what :class:`~.trainer.Trainer` runs for every batch and what
``kdengine bench step`` times: mixup / cutmix / label smoothing of the batch (optional,
:class:`~kdengine.data.augment.BatchMix`), all forwards (frozen models under ``no_grad``; every
model sees the same mixed images), the method's losses, one backward, gradient clipping
(optional), the optimizer step (gated per model where the method asks, e.g. SwitOKD's paused
teacher), the EMA updates (optional) and on-device metrics, with no host sync. On CUDA it can be
captured once per input shape and replayed (:class:`~.cuda_graph.CapturedStep`; the mixing runs
before, eagerly, on the device); ``compile=True`` puts the forwards and losses under
``torch.compile`` (the backward then runs AOTAutograd's compiled graph).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..data.augment import BatchMix
from .config import OPTIMIZERS
from .cuda_graph import CapturedStep
from .ema import ModelEma
from .metrics import pixel_accuracy, topk_correct
from .setup import Precision


def _decay_split(named: Sequence[tuple[str, nn.Parameter]], lr: float) -> list[dict]:
    """timm's ``param_groups_weight_decay``: biases and 1-D parameters (norm scales and shifts)
    get no weight decay; the groups that would be empty are left out."""
    decay = [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")]
    return [g for g in ({"params": decay, "lr": lr}, {"params": no_decay, "lr": lr, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(optim_cfg, models: Sequence[nn.Module], lrs: Sequence[Optional[float]],
                    trainable: Sequence[bool], method: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable models and the method's own parameters.

    Parameter groups: one per model, then one for the method's parameters; where biases and 1-D
    parameters take no weight decay (``optim.decay_1d`` false; the default for AdamW), each is
    split in two, the second with ``weight_decay=0``.

    Args:
        optim_cfg: the ``optim`` settings (``name``, ``lr``, ``momentum``, ``nesterov``,
            ``weight_decay``, ``decay_1d``; an object without ``name`` / ``decay_1d`` means SGD
            decaying every parameter).
        models: the run's models.
        lrs: per model, its own learning rate or None for ``optim.lr``.
        trainable: per model, whether it is optimised.
        method: the distillation method (connectors, regressors).
        device: the run's device; on CUDA the learning rate lives in a device tensor, so a
            captured step follows the schedule, and the fused kernels are used (AdamW also
            ``capturable``, which graph capture requires).

    Returns:
        The optimizer. Each group's ``initial_lr`` is the schedule's base, a float.

    Raises:
        ValueError: nothing to optimise, or an unknown ``optim.name``.
    """
    o = optim_cfg
    name = getattr(o, "name", "sgd")
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not valid; choose one of: {', '.join(OPTIMIZERS)}")
    decay_1d = getattr(o, "decay_1d", None)
    decay_1d = name == "sgd" if decay_1d is None else bool(decay_1d)
    owners = [(list(m.named_parameters()), lr or o.lr) for m, lr, tr in zip(models, lrs, trainable) if tr]
    method_params = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    if method_params:
        owners.append((method_params, o.lr))
    if not owners:
        raise ValueError("the method trains none of the models")
    if decay_1d:
        groups = [{"params": [p for _, p in named], "lr": lr} for named, lr in owners]
    else:
        groups = [g for named, lr in owners for g in _decay_split(named, lr)]
    is_cuda = device.type == "cuda"
    for g in groups:
        g["initial_lr"] = float(g["lr"])  # the schedule's base, never the mutable tensor below
        if is_cuda:
            g["lr"] = torch.tensor(float(g["lr"]), device=device)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, fused=is_cuda or None,
                                 capturable=is_cuda, foreach=None if is_cuda else True)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                           fused=is_cuda or None, foreach=None if is_cuda else True)


class JointStep:
    """One training step; ``step(images, labels, indices, step=n)`` returns on-device metrics.

    With ``mix``, the labels become soft targets ``[B, C]`` (the method's ``target``) and the
    ``<tag>/top1`` metrics count agreement with each target's largest class.

    Args:
        models: the models (their parameters are what ``optimizer`` holds).
        method: the distillation method (``trainable``, ``step_gates``, ``forward_batch``).
        optimizer: built by :func:`build_optimizer` (or any optimizer over the same parameters).
        precision: autocast dtype and layout of the run.
        tags: each model's name in the metrics (``teacher``, ``student``, ...).
        forward_models: what to call for the forwards (DDP wrappers); default ``models``.
        dist: the process group (gradients of the method's parameters are averaged); None: one
            process.
        cuda_graph: capture and replay on CUDA (ignored elsewhere).
        compile: run the forwards and losses through ``torch.compile``.
        clip_grad: clip the gradients of everything ``optimizer`` holds to this total L2 norm
            (None: no clipping); on the device, no host sync.
        emas: weight averages updated after each optimizer step.
        mix: mixup / cutmix / label smoothing of each batch, drawn from the step number.
        ignore_index: the unlabelled pixels of segmentation label maps (``[B, H, W]`` labels),
            left out of the ``<tag>/pixel_accuracy`` metric.
    """

    def __init__(self, models: Sequence[nn.Module], method: nn.Module, optimizer: torch.optim.Optimizer,
                 precision: Precision, tags: Sequence[str], *, forward_models: Optional[Sequence[nn.Module]] = None,
                 dist=None, cuda_graph: bool = False, compile: bool = False, clip_grad: Optional[float] = None,
                 emas: Sequence[ModelEma] = (), mix: Optional[BatchMix] = None, ignore_index: int = 255):
        self.models = list(models)
        self.method = method
        self.optimizer = optimizer
        self.precision = precision
        self.tags = list(tags)
        self.trainable = tuple(method.trainable)
        self.forward_models = list(forward_models) if forward_models is not None else self.models
        self.dist = dist
        self.use_cuda_graph = bool(cuda_graph) and precision.device.type == "cuda"
        self.captured: Optional[CapturedStep] = None
        self._forward_fn = torch.compile(self._forward) if compile else self._forward
        self.clip_grad = clip_grad
        self._clipped = [p for g in optimizer.param_groups for p in g["params"]]
        self.emas = list(emas)
        self.mix = mix
        self.ignore_index = int(ignore_index)
        self._calls = 0

    def autocast(self):
        """The forwards' autocast context (no weight cache inside a captured graph: it would go stale)."""
        return self.precision.autocast(cache_enabled=not self.use_cuda_graph)

    def _forward(self, images, labels, indices):
        return self.method.forward_batch(self.forward_models, images, labels, indices)

    def eager(self, images, labels, indices=None) -> dict[str, torch.Tensor]:
        """Forward, losses, backward and the optimizer step, eagerly; on-device metrics."""
        with self.autocast():
            outputs, losses = self._forward_fn(images, labels, indices)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        if self.dist is not None:
            self.dist.average_gradients([p for p in self.method.parameters() if p.requires_grad])
        if self.clip_grad is not None:
            # error_if_nonfinite=False: checking would read the norm on the host
            torch.nn.utils.clip_grad_norm_([p for p in self._clipped if p.grad is not None], self.clip_grad,
                                           error_if_nonfinite=False, foreach=True)
        self._optimizer_step(self.method.step_gates())
        for ema in self.emas:
            ema.update()
        metrics = {"loss": losses.total.detach().float()}
        metrics.update({k: v.detach().float() for k, v in losses.terms.items()})
        if labels.dim() == 3:  # segmentation: label maps
            for tag, out in zip(self.tags, outputs):
                metrics[f"{tag}/pixel_accuracy"] = pixel_accuracy(out.logits.detach(), labels, self.ignore_index)
            return metrics
        classes = labels if labels.dim() == 1 else labels.argmax(1)  # soft targets: their largest class
        for tag, out in zip(self.tags, outputs):
            metrics[f"{tag}/top1"] = topk_correct(out.logits.detach(), classes, ks=(1,))[0].float() / labels.shape[0]
        return metrics

    def _optimizer_step(self, gates: Optional[torch.Tensor]) -> None:
        """The optimizer step; where the method gates a model off this iteration (``gates[m] == 0``)
        its parameters and optimizer state (momentum; Adam's moments and step count) are put
        back, on the device (no host sync)."""
        if gates is None:
            self.optimizer.step()
            return
        gated = [p for i, m in enumerate(self.models) if self.trainable[i] for p in m.parameters()]
        owner = [i for i, m in enumerate(self.models) if self.trainable[i] for _ in m.parameters()]
        before = [p.detach().clone() for p in gated]
        states = [{k: v.clone() for k, v in self.optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
                  for p in gated]
        self.optimizer.step()
        with torch.no_grad():
            for p, old, old_state, i in zip(gated, before, states, owner):
                keep = 1.0 - gates[i].to(p.dtype)  # 1: undo this model's step
                p.lerp_(old, keep)
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        # state this step created was zero before it
                        value.lerp_(old_state.get(key, torch.zeros_like(value)), keep.to(value.dtype))

    def __call__(self, images, labels, indices=None, step: Optional[int] = None) -> dict[str, torch.Tensor]:
        """One step on a batch; ``step`` (the run's step number) seeds the ``mix`` draws (default:
        this object's call count)."""
        if self.mix is not None:
            images, labels = self.mix(images, labels, self._calls if step is None else step)
        self._calls += 1
        if self.use_cuda_graph:
            if self.captured is None:
                self.captured = CapturedStep(self.eager, warmup=3)
            return self.captured(images, labels, indices)
        return self.eager(images, labels, indices)
