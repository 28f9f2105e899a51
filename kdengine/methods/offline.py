"""Offline distillation: a pretrained teacher, frozen (``trainable`` False), teaches students.

KD (Hinton et al., 2015), DKD (Zhao et al., CVPR 2022) and FitNet (Romero et al., ICLR 2015),
each with an optional ADM term (``<name>+adm``; ADM paper Sec. 5.5: alpha, beta, gamma =
1/0/0 on CIFAR-100, 0.1/0/0 on ImageNet: only the student's consensus loss, since the frozen
teacher cannot learn from L_di). One teacher; every student is distilled from it on its own.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..losses.kl import kd_kl, soft_probs
from ..models.base import ModelOutput
from .base import Method, at_least_fp32, stage_channels, students_of, teachers_of


class OfflineMethod(Method):
    """Base of the offline methods: one frozen teacher (``trainable`` False), one or more
    students, each distilled from the teacher on its own.

    Args:
        roles: exactly one ``"teacher"`` and at least one ``"student"``.
        num_classes: width of every model's logits.
        adm: the ADM component of a ``<method>+adm``, or None.
    """

    def __init__(self, roles, num_classes, adm=None):
        super().__init__(roles, num_classes, adm)
        self.teacher = teachers_of(self.roles)[0]
        self.students = students_of(self.roles)

    @classmethod
    def check_roles(cls, roles, name=None):
        roles = super().check_roles(roles, name)
        if len(teachers_of(roles)) != 1 or not students_of(roles):
            raise ValueError(
                f"{name or cls.__name__}: offline distillation needs exactly one (frozen) teacher and at "
                f"least one student, got roles {roles}"
            )
        return roles

    @classmethod
    def trainable_of(cls, roles):
        return tuple(r != "teacher" for r in roles)


class KD(OfflineMethod):
    """Knowledge distillation (Hinton et al., 2015), per student:
    ``ce_weight * CE(z_s, y) + kd_weight * tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau))``
    (ADM paper Eq. 2-3 with a fixed teacher). The ADM paper does not give its offline KD settings
    (Tables 8-9), so the defaults are mdistiller's: CIFAR-100 ``tau = 4``, weights 0.1 / 0.9;
    ImageNet ``tau = 1``, weights 0.5 / 0.5.

    Args:
        roles: one teacher, one or more students.
        num_classes: width of the logits.
        ce_weight, kd_weight: weights of CE and of the KL term.
        temperature: tau.
        adm: the ADM component of ``kd+adm``, or None.
    """

    soft_targets = True  # the target is used only by cross-entropy, which takes class probabilities

    def __init__(self, roles, num_classes, *, ce_weight=0.1, kd_weight=0.9, temperature=4.0, adm=None):
        super().__init__(roles, num_classes, adm)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.temperature = float(temperature)

    def losses(self, outputs, target, terms):
        p_t = soft_probs(outputs[self.teacher].logits, self.temperature)
        for s in self.students:
            z = outputs[s].logits
            terms[f"ce/{s}"] = self.ce_weight * F.cross_entropy(z, target)
            terms[f"kl/{s}"] = self.kd_weight * kd_kl(z, p_t, self.temperature)
        return None


def dkd_parts(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, temperature: float):
    """DKD's two terms (Zhao et al., CVPR 2022, Eq. 7), each ``tau^2 * KL`` averaged over the batch:

    TCKD ``= KL(b_t || b_s)`` on the binary (target, all other classes) probabilities, and
    NCKD ``= KL(p^_t || p^_s)`` on the distribution among the non-target classes. The teacher's
    side is detached. Computed in fp32 with log-sum-exps (no ``log(0)``).
    """
    tau = temperature
    zs = at_least_fp32(z_s) / tau
    zt = at_least_fp32(z_t.detach()) / tau
    gt = F.one_hot(target, zs.shape[1]).bool()
    neg = torch.finfo(zs.dtype).min / 4

    def binary_log(z):  # log [p_gt, 1 - p_gt]
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        log_gt = z.gather(1, target.view(-1, 1)) - lse
        log_other = torch.logsumexp(z.masked_fill(gt, neg), dim=1, keepdim=True) - lse
        return torch.cat([log_gt, log_other], dim=1)

    log_b_s, log_b_t = binary_log(zs), binary_log(zt)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True) * tau**2
    log_nt_s = F.log_softmax(zs.masked_fill(gt, neg), dim=1)
    p_nt_t = F.softmax(zt.masked_fill(gt, neg), dim=1)
    nckd = F.kl_div(log_nt_s, p_nt_t, reduction="batchmean") * tau**2
    return tckd, nckd


class DKD(OfflineMethod):
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022, Eq. 7), per student:
    ``ce_weight * CE + w(epoch) * (alpha * TCKD + beta * NCKD)`` (:func:`dkd_parts`), with the
    linear warm-up ``w = min((epoch + 1) / warmup, 1)``: mdistiller's ``min(epoch / warmup, 1)``
    with its 1-based epochs. Defaults: mdistiller's CIFAR-100 setting ``alpha = 1, beta = 8,
    tau = 4, warmup = 20`` (its per-pair configs lower beta to 2 or 6 for some pairs); ImageNet
    ``alpha = 1, beta = 0.5, tau = 1, warmup = 1``.

    ``w`` lives in an fp64 buffer set by ``start_epoch`` (``fill_``: graph-safe), so it holds
    exactly the Python value of the formula at every epoch; ``forward`` casts it to the losses'
    dtype, which is the rounding mdistiller's Python float gets when it scales an fp32 tensor.

    Args:
        roles: one teacher, one or more students.
        num_classes: width of the logits.
        ce_weight, alpha, beta: weights of CE, TCKD and NCKD.
        temperature: tau.
        warmup: epochs of the linear warm-up (0: none).
        adm: the ADM component of ``dkd+adm``, or None.
    """

    def __init__(self, roles, num_classes, *, ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0,
                 warmup=20, adm=None):
        super().__init__(roles, num_classes, adm)
        if warmup < 0:
            raise ValueError(f"dkd warmup must be >= 0 epochs, got {warmup}")
        self.ce_weight, self.alpha, self.beta = float(ce_weight), float(alpha), float(beta)
        self.temperature, self.warmup = float(temperature), int(warmup)
        self.register_buffer("warmup_factor", torch.tensor(self.factor(0), dtype=torch.float64))

    def factor(self, epoch: int) -> float:
        """The warm-up factor of ``epoch`` (0-based): ``min((epoch + 1) / warmup, 1)``."""
        return 1.0 if self.warmup == 0 else min((epoch + 1) / self.warmup, 1.0)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        super().start_epoch(epoch, epochs)
        self.warmup_factor.fill_(self.factor(epoch))

    def losses(self, outputs, target, terms):
        z_t = outputs[self.teacher].logits
        terms["warmup"] = self.warmup_factor
        for s in self.students:
            z = outputs[s].logits
            tckd, nckd = dkd_parts(z, z_t, target, self.temperature)
            terms[f"ce/{s}"] = self.ce_weight * F.cross_entropy(z, target)
            terms[f"kl/{s}"] = self.warmup_factor.to(tckd.dtype) * (self.alpha * tckd + self.beta * nckd)
            terms[f"tckd/{s}"] = tckd
            terms[f"nckd/{s}"] = nckd
        return None


class HintRegressor(nn.Module):
    """FitNet's regressor r: 1x1 conv + BN + ReLU from the student's hint channels to the
    teacher's (mdistiller's ConvReg for equal sizes). Where the spatial sizes differ, the larger of
    the regressed student map and the teacher's hint is area-pooled to the smaller (mdistiller
    uses a strided or transposed conv there; it needs the input size at construction).

    Args:
        in_channels: the student's hint channels.
        out_channels: the teacher's hint channels.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def hint_map(output: ModelOutput, index: int) -> torch.Tensor:
    """The map FitNet regresses at entry ``index`` of a model's output: mdistiller's ``feats``.

    Args:
        output: a model's ``ModelOutput``.
        index: the hint layer (an index into ``features``).

    Returns:
        ``output.hints[index]`` where the model lists hints, else ``relu(output.features[index])``.

    Raises:
        ValueError: ``hints`` does not list one map per entry of ``features``.
    """
    if output.hints is None:
        return F.relu(output.features[index])
    if len(output.hints) != len(output.features):
        raise ValueError(
            f"a model's hints must list one map per entry of features ({len(output.features)}), "
            f"got {len(output.hints)}"
        )
    return output.hints[index]


class FitNet(OfflineMethod):
    """FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015), trained jointly with CE as in
    mdistiller: ``ce_weight * CE(z_s, y) + feat_weight * MSE(r(H_s[h]), H_t[h])``, with r a
    :class:`HintRegressor` and the teacher's hint detached (``ops.feature_mse``).

    The hint maps ``H`` are what mdistiller regresses, its models' ``feats`` (:func:`hint_map`:
    ``ModelOutput.hints`` where a model lists them, else ``relu(features)``):

    - CIFAR ResNets (``resnet8`` ... ``resnet32x4``), ``resnet18_cifar`` / ``resnet50_cifar``,
      VGG, ShuffleNetV1: each stage's output after its ReLU, ``relu(features[i])``.
    - ShuffleNetV2: ``relu(features[i])``, i.e. the shuffled concatenation after the ReLU.
    - WRN (pre-activation): the raw stem conv and block1-3 outputs, before any BN or ReLU
      (``hints``; ``relu(features[i])`` would be the next unit's BN-ReLU of them).
    - CIFAR MobileNetV2: ``relu`` of the stem, then blocks 1, 2 and 4's linear-bottleneck outputs
      as they are, no activation (``hints``); the last entry is ``relu`` of the 1280-channel map
      (mdistiller's last entry, block 6's 320 channels, has no counterpart).

    mdistiller's CIFAR-100 setting: ``ce_weight = 1``, ``feat_weight = 100``, and
    ``FITNET.HINT_LAYER = 2`` for every pair (its one FitNet config keeps the default).
    ``hint_layer = None`` picks ``len(features) // 2``, which is 2 for every CIFAR family (4 or
    5 entries, as mdistiller's ``feats``): the same map.

    Args:
        roles: one teacher, one or more students.
        num_classes: width of the logits.
        models: the models (their ``stage_channels`` size the regressors).
        ce_weight, feat_weight: weights of CE and the hint MSE.
        hint_layer: the index into each model's ``features`` (negative counts from the end);
            None: ``len(features) // 2`` per model.
        impl: backend of ``ops.feature_mse``.
        adm: the ADM component of ``fitnet+adm``, or None.

    Raises:
        ValueError: ``hint_layer`` out of range for a model, or a model without ``stage_channels``.
    """

    soft_targets = True  # the target is used only by cross-entropy, which takes class probabilities

    def __init__(self, roles, num_classes, models: Sequence[nn.Module], *, ce_weight=1.0,
                 feat_weight=100.0, hint_layer: Optional[int] = None, impl: Optional[str] = None,
                 adm=None):
        super().__init__(roles, num_classes, adm)
        self.ce_weight, self.feat_weight, self.impl = float(ce_weight), float(feat_weight), impl
        ch_t = stage_channels(models[self.teacher], self.teacher)
        self.hint_layers = {}
        self.regressors = nn.ModuleDict()
        for s in self.students:
            ch_s = stage_channels(models[s], s)
            hs = self._resolve(hint_layer, len(ch_s), s)
            ht = self._resolve(hint_layer, len(ch_t), self.teacher)
            self.hint_layers[s] = (hs, ht)
            self.regressors[str(s)] = HintRegressor(ch_s[hs], ch_t[ht])

    @staticmethod
    def _resolve(hint_layer, n: int, model: int) -> int:
        h = n // 2 if hint_layer is None else int(hint_layer)
        if not -n <= h < n:
            raise ValueError(f"fitnet hint_layer {hint_layer} is out of range for model {model}'s {n} stages")
        return h % n

    def losses(self, outputs, target, terms):
        for s in self.students:
            hs, ht = self.hint_layers[s]
            f_s = self.regressors[str(s)](hint_map(outputs[s], hs))
            f_t = hint_map(outputs[self.teacher], ht).detach()
            size = min(f_s.shape[-2:], f_t.shape[-2:], key=lambda hw: hw[0] * hw[1])
            if tuple(f_s.shape[-2:]) != tuple(size):
                f_s = F.adaptive_avg_pool2d(f_s, size)
            if tuple(f_t.shape[-2:]) != tuple(size):
                f_t = F.adaptive_avg_pool2d(f_t, size)
            z = outputs[s].logits
            terms[f"ce/{s}"] = self.ce_weight * F.cross_entropy(z, target)
            terms[f"hint/{s}"] = self.feat_weight * ops.feature_mse(f_s, f_t.to(f_s.dtype), impl=self.impl)
        return None
