"""Online distillation: every model trains from scratch in the same step.

Vanilla (each model its own CE), DML (Zhang et al., CVPR 2018; ADM paper Eq. 2-4), KDCL (Guo et
al., CVPR 2020) and SwitOKD (Qian et al., ECCV 2022). Each takes an optional :class:`ADMPairs`
(``<name>+adm``, ADM paper Eq. 5-12) added between every teacher and every student.

Each also trains segmentation models (``task="segmentation"``, the ADM paper's Sec. 5.3 / Table 5):
``ce/m`` is then the segmentation loss (:func:`~kdengine.losses.seg_cross_entropy`: logits
upsampled bilinearly to the label map, ignored pixels left out, plus ``aux_weight`` times the
auxiliary head's), the KL terms are per pixel at the logits' grid averaged over **every** pixel
(ignored ones too: the KL needs no label; CIRKD's ``CriterionKD`` does the same), and the rules
that read labels (KDCL's MinLogit ensemble, SwitOKD's distances) read the label map
nearest-downsampled to that grid (``Method.grid_target``): KDCL's ensemble is per pixel, with
ignored pixels gathering class 0 (any class gives a valid MinLogit ensemble; those pixels have no
label to prefer); SwitOKD's distances are per pixel, averaged over the labelled pixels only, and
the switch stays one decision per (teacher, student) pair and step (it gates the teacher's
optimizer step).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..losses.dml import mutual_kl
from ..losses.kl import kd_kl, soft_probs
from .base import Method, at_least_fp32, students_of, teachers_of

KDCL_ENSEMBLES = ("minlogit", "mean")


def _ce_terms(method: Method, outputs, target, models: Sequence[int], terms: dict) -> None:
    for m in models:
        terms[f"ce/{m}"] = method.cross_entropy(outputs[m], target)


class _Mutual(Method):
    """An online method among two or more models, each trained (checks the model count)."""

    @classmethod
    def check_roles(cls, roles, name=None):
        roles = super().check_roles(roles, name)
        if len(roles) < 2:
            raise ValueError(f"{name or cls.__name__}: needs two or more models, got {len(roles)}")
        return roles


class Vanilla(Method):
    """Each model trained alone: ``L_m = CE(z_m, y)`` (ADM paper Eq. 1).

    With one model this is how ``--method vanilla`` trains an offline teacher. ``vanilla+adm`` is
    ADM without the DML term, ``L = sum_m CE_m + L_adm + gamma * L_feat`` (the "ADM" column of
    the ADM paper's Table 14, "individual effectiveness of ADM").

    Args:
        roles: one role per model (any roles, one model or more).
        num_classes: width of the logits.
        adm: the ADM component of ``vanilla+adm``, or None.
        task, seg: see :class:`~kdengine.methods.base.Method`.
    """

    soft_targets = True  # the target is used only by cross-entropy, which takes class probabilities

    def losses(self, outputs, target, terms):
        _ce_terms(self, outputs, target, range(len(outputs)), terms)
        return None


class DML(_Mutual):
    """Deep Mutual Learning, ADM paper Eq. 4: ``L_dml = sum_m [CE(z_m, y) + lambda * L_kd^m]``
    with ``L_kd^m = tau^2 KL(p_other || p_m)`` (Eq. 2-3), the other model's prediction detached
    and, with more than two models, the KL averaged over the others (:func:`~kdengine.losses.mutual_kl`,
    as ``DMLLoss``).
    Paper setting (Sec. 5.1): ``tau = 1``, ``lambda = 1``. ``dml+adm`` is Eq. 10:
    ``L_total = L_dml + gamma * L_feat + L_adm`` with ADM between each teacher and each student
    (Sec. 5.6: DML among all three models in 1T2S / 2T1S).

    Args:
        roles: one role per model (two or more models).
        num_classes: width of the logits.
        weight: lambda.
        temperature: tau.
        adm: the ADM component of ``dml+adm``, or None.
        task, seg: see :class:`~kdengine.methods.base.Method`.
    """

    soft_targets = True  # the target is used only by cross-entropy, which takes class probabilities

    def __init__(self, roles, num_classes, *, weight=1.0, temperature=1.0, adm=None, task="classification",
                 seg=None):
        super().__init__(roles, num_classes, adm, task=task, seg=seg)
        self.weight, self.temperature = float(weight), float(temperature)

    def losses(self, outputs, target, terms):
        _ce_terms(self, outputs, target, range(len(outputs)), terms)
        for m, kl in enumerate(mutual_kl([o.logits for o in outputs], self.temperature)):
            terms[f"kl/{m}"] = self.weight * kl
        return None


def kdcl_ensemble(logits: Sequence[torch.Tensor], target: torch.Tensor, kind: str = "minlogit"):
    """KDCL's ensemble logits (Guo et al., CVPR 2020, Sec. 3.2), detached.

    ``"minlogit"`` (KDCL-MinLogit, Eq. 7 of the KDCL paper): shift each model's logits so the
    target class sits at 0, ``z^m - z^m_y``, then take the element-wise minimum over the models.
    ``"mean"``: the plain average of the logits (the naive ensemble).

    Args:
        logits: every model's logits, ``[B, C]`` or ``[B, C, *]`` (per pixel) each.
        target: class indices ``[B]`` or ``[B, *]``, every entry in ``[0, C)`` (segmentation:
            ignored pixels replaced by some class, see ``Method.grid_target``).
        kind: ``"minlogit"`` or ``"mean"``.

    Returns:
        The ensemble logits, the logits' shape, fp32 at least, detached.
    """
    zs = torch.stack([at_least_fp32(z.detach()) for z in logits])  # [M, B, C, *]
    if kind == "mean":
        return zs.mean(0)
    if kind != "minlogit":
        raise ValueError(f"kdcl ensemble must be one of {KDCL_ENSEMBLES}, got {kind!r}")
    idx = target.unsqueeze(1).unsqueeze(0)  # [1, B, 1, *]
    idx = idx.expand(zs.shape[0], *idx.shape[1:])
    return (zs - zs.gather(2, idx)).amin(0)


class KDCL(_Mutual):
    """KDCL, Online Knowledge Distillation via Collaborative Learning (Guo et al., CVPR 2020):
    every model ``m`` minimises ``CE(z_m, y) + lambda * tau^2 KL(softmax(z_e / tau) || p_m)``
    with ``z_e`` the detached ensemble of all models' logits (KDCL Eq. 1-2), by default
    KDCL-MinLogit (KDCL Eq. 7, see :func:`kdcl_ensemble`): the variant the online-KD literature
    the ADM paper follows (SwitOKD, SHAKE) reports as "KDCL", needing no validation set, unlike
    KDCL-Linear/-General. The ADM paper fixes ``tau = 1``, ``lambda = 1`` for every method
    (Sec. 5.1). KDCL's per-model data augmentation is a data-pipeline matter, not modelled here.

    Args:
        roles: one role per model (two or more models).
        num_classes: width of the logits.
        weight: lambda.
        temperature: tau.
        ensemble: ``"minlogit"`` or ``"mean"`` (:func:`kdcl_ensemble`).
        adm: the ADM component of ``kdcl+adm``, or None.
        task, seg: see :class:`~kdengine.methods.base.Method`.
    """

    def __init__(self, roles, num_classes, *, weight=1.0, temperature=1.0, ensemble="minlogit", adm=None,
                 task="classification", seg=None):
        super().__init__(roles, num_classes, adm, task=task, seg=seg)
        if ensemble not in KDCL_ENSEMBLES:
            raise ValueError(f"kdcl ensemble must be one of {KDCL_ENSEMBLES}, got {ensemble!r}")
        self.weight, self.temperature, self.ensemble = float(weight), float(temperature), ensemble

    def losses(self, outputs, target, terms):
        _ce_terms(self, outputs, target, range(len(outputs)), terms)
        labels, _ = self.grid_target(target, outputs[0].logits)
        z_e = kdcl_ensemble([o.logits for o in outputs], labels, self.ensemble)
        p_e = soft_probs(z_e, self.temperature)
        for m, o in enumerate(outputs):
            terms[f"kl/{m}"] = self.weight * kd_kl(o.logits, p_e, self.temperature)
        return None


def switokd_switch(z_t: torch.Tensor, z_s: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                   valid: Optional[torch.Tensor] = None):
    """SwitOKD's switching rule (Qian et al., ECCV 2022, Sec. 3.2-3.3), all on the device.

    With batch means of L1 distances of softened predictions (``tau``; the authors' code: 1):
    distillation gap ``G = ||p_t - p_s||_1``, ``d_s = ||p_s - y||_1``, ``d_t = ||p_t - y||_1``,
    adaptive threshold ``delta = d_s - exp(-d_t / (d_s + d_t)) * d_t``. The teacher is in
    *expert* ("downtime") mode, paused while the student keeps learning, when ``G > delta`` and
    ``d_t < d_s`` (the second condition is in the authors' code); otherwise in *learning* mode.

    Dense logits ``[B, C, *]`` (segmentation) give the distances per pixel; the means then run
    over the pixels where ``valid`` is True (all three of them, so that ignored pixels count
    nowhere; none valid: every distance 0, learning mode), and the switch is still one decision.

    Args:
        z_t, z_s: the teacher's and the student's logits, ``[B, C]`` or ``[B, C, *]``.
        target: class indices ``[B]`` or ``[B, *]``, every entry in ``[0, C)``.
        temperature: tau.
        valid: optional bool ``[B, *]``: the pixels the means run over (None: all).

    Returns ``(expert, gap, threshold)``: a 0-d bool tensor and two 0-d floats. No host sync.
    """
    p_t = F.softmax(at_least_fp32(z_t.detach()) / temperature, dim=1)
    p_s = F.softmax(at_least_fp32(z_s.detach()) / temperature, dim=1)
    onehot = F.one_hot(target, z_t.shape[1]).to(p_t.dtype)
    if onehot.dim() > 2:  # [B, *, C] -> [B, C, *], the logits' layout
        onehot = onehot.movedim(-1, 1)

    def mean(d: torch.Tensor) -> torch.Tensor:
        if valid is None:
            return d.mean()
        w = valid.to(d.dtype)
        return (d * w).sum() / w.sum().clamp_min(1)

    d_t = mean((p_t - onehot).abs().sum(1))
    d_s = mean((p_s - onehot).abs().sum(1))
    gap = mean((p_t - p_s).abs().sum(1))
    threshold = d_s - torch.exp(-d_t / (d_s + d_t).clamp_min(1e-12)) * d_t
    expert = (gap > threshold) & (d_t < d_s)
    return expert, gap, threshold


class SwitOKD(Method):
    """Switchable Online Knowledge Distillation (Qian et al., ECCV 2022).

    DML's losses (ADM paper Eq. 2-4; ``tau = 1``, ``lambda = 1``) with each teacher switching
    per step between *learning* mode (it trains: ``CE_t + KL(p_s || p_t)``) and *expert*
    ("downtime") mode (its loss is dropped; the student still learns ``CE_s + KL(p_t || p_s)``)
    by :func:`switokd_switch`. The switch is a device-side mask (``torch.where``): no host sync,
    so the step stays inside a CUDA graph; ``"switch/<teacher>"`` logs 1 for learning, 0 for
    expert mode, and ``step_gates()`` exposes it so the engine can skip the paused teacher's
    optimizer step altogether, as the authors' code does.

    Three or more models follow SwitOKD's multi-network code (Sec. 3.5; 1T2S and 2T1S): every
    (teacher, student) pair switches on its own; a teacher's KL term from a student is masked by
    that pair's mode, and its CE and KL terms from other teachers are dropped only when it is in
    expert mode against every student. Students always learn from everyone. Unlike the authors'
    code, which sums a model's KL terms, they are averaged over the other models as in DML
    (identical with two models).

    ``switokd+adm``: ADM between each teacher and each student (ADM paper Table 1, 11); the
    teacher's ``beta * L_di`` of a pair is masked like its KL term from that student.

    Args:
        roles: at least one teacher and one student.
        num_classes: width of the logits.
        weight: lambda.
        temperature: tau (of the KL terms and of the switch).
        adm: the ADM component of ``switokd+adm``, or None.
        task, seg: see :class:`~kdengine.methods.base.Method`.
    """

    def __init__(self, roles, num_classes, *, weight=1.0, temperature=1.0, adm=None, task="classification",
                 seg=None):
        super().__init__(roles, num_classes, adm, task=task, seg=seg)
        self.weight, self.temperature = float(weight), float(temperature)
        self.teacher_ids, self.student_ids = teachers_of(self.roles), students_of(self.roles)
        self.register_buffer("gates", torch.ones(len(self.roles)))

    @classmethod
    def check_roles(cls, roles, name=None):
        roles = super().check_roles(roles, name)
        if not teachers_of(roles) or not students_of(roles):
            raise ValueError(f"{name or cls.__name__}: needs at least one teacher and one student, got roles {roles}")
        return roles

    def step_gates(self) -> Optional[torch.Tensor]:
        return self.gates

    def losses(self, outputs, target, terms):
        learn = {}  # (teacher, student) -> 0-d float: 1 learning, 0 expert
        labels, valid = self.grid_target(target, outputs[0].logits)
        for t in self.teacher_ids:
            for s in self.student_ids:
                expert, gap, threshold = switokd_switch(
                    outputs[t].logits, outputs[s].logits, labels, self.temperature, valid
                )
                learn[(t, s)] = torch.where(expert, 0.0, 1.0)
                terms[f"gap/{t}-{s}"] = gap
                terms[f"threshold/{t}-{s}"] = threshold
        # a teacher is active unless in expert mode against every student
        active = {t: 1.0 - torch.stack([1.0 - learn[(t, s)] for s in self.student_ids]).prod()
                  for t in self.teacher_ids}
        kl_gates = {(t, k): learn[(t, k)] if k in self.student_ids else active[t]
                    for t in self.teacher_ids for k in range(len(outputs)) if k != t}
        # each model's CE built before its KL terms, as the reference loop did: the same autograd
        # accumulation order, so the same gradients to the last bit
        ces = [self.cross_entropy(o, target) for o in outputs]
        kls = mutual_kl([o.logits for o in outputs], self.temperature, kl_gates)
        gates = []
        for m, ce in enumerate(ces):
            if m in self.teacher_ids:
                terms[f"switch/{m}"] = active[m]
                terms[f"ce/{m}"] = active[m] * ce
                gates.append(active[m])
            else:
                terms[f"ce/{m}"] = ce
                gates.append(torch.ones((), device=ce.device))
            terms[f"kl/{m}"] = self.weight * kls[m]
        if self.training:
            self.gates.copy_(torch.stack(gates))
        return learn
