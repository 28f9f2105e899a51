"""The joint training step of M models under a distillation method, and its optimizer.

:class:`JointStep` is what :class:`~.trainer.Trainer` runs for every batch and what
``kdengine bench step`` times: all forwards (frozen models under ``no_grad``), the method's losses,
one backward, the optimizer step (gated per model where the method asks, e.g. SwitOKD's paused
teacher) and on-device metrics, with no host sync. On CUDA it can be captured once per input
shape and replayed (:class:`~.cuda_graph.CapturedStep`); ``compile=True`` puts the forwards and
losses under ``torch.compile`` (the backward then runs AOTAutograd's compiled graph).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .cuda_graph import CapturedStep
from .metrics import topk_correct
from .setup import Precision


def build_optimizer(optim_cfg, models: Sequence[nn.Module], lrs: Sequence[Optional[float]],
                    trainable: Sequence[bool], method: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD over the trainable models (one parameter group each) and the method's own parameters.

    Args:
        optim_cfg: the ``optim`` settings (``lr``, ``momentum``, ``nesterov``, ``weight_decay``).
        models: the run's models.
        lrs: per model, its own learning rate or None for ``optim.lr``.
        trainable: per model, whether it is optimised.
        method: the distillation method (connectors, regressors).
        device: the run's device; on CUDA the learning rate lives in a device tensor, so a
            captured step follows the schedule, and the fused SGD kernel is used.

    Returns:
        The optimizer. Each group's ``initial_lr`` is the schedule's base, a float.

    Raises:
        ValueError: nothing to optimise.
    """
    o = optim_cfg
    groups = [{"params": list(m.parameters()), "lr": lr or o.lr} for m, lr, tr in zip(models, lrs, trainable) if tr]
    method_params = [p for p in method.parameters() if p.requires_grad]
    if method_params:
        groups.append({"params": method_params, "lr": o.lr})
    if not groups:
        raise ValueError("the method trains none of the models")
    is_cuda = device.type == "cuda"
    for g in groups:
        g["initial_lr"] = float(g["lr"])  # the schedule's base, never the mutable tensor below
        if is_cuda:
            g["lr"] = torch.tensor(float(g["lr"]), device=device)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                           fused=is_cuda or None, foreach=None if is_cuda else True)


class JointStep:
    """One training step; ``step(images, labels, indices)`` returns on-device metrics.

    Args:
        models: the models (their parameters are what ``optimizer`` holds).
        method: the distillation method (``trainable``, ``step_gates``, ``forward``).
        optimizer: built by :func:`build_optimizer` (or any optimizer over the same parameters).
        precision: autocast dtype and layout of the run.
        tags: each model's name in the metrics (``teacher``, ``student``, ...).
        forward_models: what to call for the forwards (DDP wrappers); default ``models``.
        dist: the process group (gradients of the method's parameters are averaged); None: one
            process.
        cuda_graph: capture and replay on CUDA (ignored elsewhere).
        compile: run the forwards and losses through ``torch.compile``.
    """

    def __init__(self, models: Sequence[nn.Module], method: nn.Module, optimizer: torch.optim.Optimizer,
                 precision: Precision, tags: Sequence[str], *, forward_models: Optional[Sequence[nn.Module]] = None,
                 dist=None, cuda_graph: bool = False, compile: bool = False):
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

    def autocast(self):
        """The forwards' autocast context (no weight cache inside a captured graph: it would go stale)."""
        return self.precision.autocast(cache_enabled=not self.use_cuda_graph)

    def _forward(self, images, labels, indices):
        outputs = []
        for model, trainable in zip(self.forward_models, self.trainable):
            if trainable:
                outputs.append(model(images))
            else:
                with torch.no_grad():
                    outputs.append(model(images))
        return outputs, self.method(outputs, labels, indices)

    def eager(self, images, labels, indices=None) -> dict[str, torch.Tensor]:
        """Forward, losses, backward and the optimizer step, eagerly; on-device metrics."""
        with self.autocast():
            outputs, losses = self._forward_fn(images, labels, indices)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        if self.dist is not None:
            self.dist.average_gradients([p for p in self.method.parameters() if p.requires_grad])
        self._optimizer_step(self.method.step_gates())
        metrics = {"loss": losses.total.detach().float()}
        metrics.update({k: v.detach().float() for k, v in losses.terms.items()})
        for tag, out in zip(self.tags, outputs):
            metrics[f"{tag}/top1"] = topk_correct(out.logits.detach(), labels, ks=(1,))[0].float() / labels.shape[0]
        return metrics

    def _optimizer_step(self, gates: Optional[torch.Tensor]) -> None:
        """The optimizer step; where the method gates a model off this iteration (``gates[m] == 0``)
        its parameters and momentum are put back, on the device (no host sync)."""
        if gates is None:
            self.optimizer.step()
            return
        gated = [p for i, m in enumerate(self.models) if self.trainable[i] for p in m.parameters()]
        owner = [i for i, m in enumerate(self.models) if self.trainable[i] for _ in m.parameters()]
        before = [p.detach().clone() for p in gated]
        momenta = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in gated]
        momenta = [None if b is None else b.clone() for b in momenta]
        self.optimizer.step()
        with torch.no_grad():
            for p, old, old_m, i in zip(gated, before, momenta, owner):
                keep = 1.0 - gates[i].to(p.dtype)  # 1: undo this model's step
                p.lerp_(old, keep)
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.lerp_(old_m if old_m is not None else torch.zeros_like(buf), keep)

    def __call__(self, images, labels, indices=None) -> dict[str, torch.Tensor]:
        if self.use_cuda_graph:
            if self.captured is None:
                self.captured = CapturedStep(self.eager, warmup=3)
            return self.captured(images, labels, indices)
        return self.eager(images, labels, indices)
