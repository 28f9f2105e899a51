"""OFA-KD (Hao et al., NeurIPS 2023), the strongest logit-space baseline of the PAT tables, and the
helpers the heterogeneous methods (OFA, PAT) share: the four stage features of any zoo model,
class-token stripping, the shape probe, and the projector initialisation.

Follows the authors' code (github Hao840/OFAKD ``distillers/ofa.py``, which PAT's repository
carries unchanged).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.base import ModelOutput
from ..models.layers import Attention, Mlp
from .base import stage_channels
from .offline import OfflineMethod, hint_map

#: Stage features the heterogeneous methods use per model: the last four entries of its
#: ``hints`` (ResNets: the ReLUs of layer1-4; MobileNetV2: blocks 2, 5, 12 and the head conv;
#: ViT/Mixer: blocks 1, 3, 9, 11; Swin, ConvNeXt: the stage outputs).
NUM_STAGES = 4


def stage_features(output: ModelOutput, num_stages: int = NUM_STAGES) -> list[torch.Tensor]:
    """The last ``num_stages`` stage features of a model's output, as OFA-KD and PAT tap them
    (``hint_map``: the listed ``hints``, else the ReLU of ``features``).

    Args:
        output: a zoo model's ``ModelOutput``.
        num_stages: how many (from the end).

    Returns:
        Maps [B, C, H, W] or token sequences [B, L, C], first stage first.

    Raises:
        ValueError: the model reports fewer stages.
    """
    n = len(output.features)
    if n < num_stages:
        raise ValueError(f"the model reports {n} stage features; heterogeneous distillation taps the last {num_stages}")
    return [hint_map(output, i) for i in range(n - num_stages, n)]


def drop_class_tokens(x: torch.Tensor, num_prefix_tokens: int, last: bool = False) -> torch.Tensor:
    """A stage feature without its class token(s): maps unchanged; tokens [B, L, C] without the
    ``num_prefix_tokens`` leading tokens (timm puts the class token at index 0), or, with
    ``last``, without the last token when L is not a perfect square (the rule of PAT's public
    code, which drops a patch token of a timm ViT and keeps its class token).

    Args:
        x: [B, C, H, W] or [B, L, C].
        num_prefix_tokens: the model's leading non-patch tokens.
        last: PAT's public-code rule instead.

    Returns:
        The feature, a view.
    """
    if x.dim() != 3:
        return x
    if last:
        n = x.shape[1]
        return x[:, :-1] if math.isqrt(n) ** 2 != n else x
    return x[:, num_prefix_tokens:] if num_prefix_tokens else x


def input_size(img_size: Optional[int], models: Sequence[nn.Module], method: str) -> int:
    """The side of the training input the method's modules are sized for.

    Args:
        img_size: given explicitly (the method option), or None.
        models: the run's models; those built for one input size declare ``img_size``.
        method: the method's name, for the messages.

    Returns:
        ``img_size`` if given, else the one ``img_size`` the models declare.

    Raises:
        ValueError: none given and none declared, or the models declare different sizes.
    """
    if img_size is not None:
        if int(img_size) <= 0:
            raise ValueError(f"{method}: img_size must be a positive int, got {img_size!r}")
        return int(img_size)
    sizes = sorted({int(m.img_size) for m in models if getattr(m, "img_size", None)})
    if len(sizes) > 1:
        raise ValueError(f"{method}: the models are built for different img_size {sizes}")
    if not sizes:
        raise ValueError(f"{method}: no model declares its input size: give method.options.{method}.img_size "
                         "(the side of the training images)")
    return sizes[0]


@torch.no_grad()
def probe(model: nn.Module, img_size: int, forward=None):
    """One eval-mode forward of a zeros batch (one image) to read the shapes of a model's outputs.

    Args:
        model: the model (its mode is restored afterwards; no state changes).
        img_size: the input side.
        forward: ``forward(model, x)`` to run instead of ``model(x)``.

    Returns:
        What the forward returns.
    """
    p = next(model.parameters(), None)
    x = torch.zeros(1, 3, img_size, img_size, device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None and p.is_floating_point() else None)
    was = model.training
    model.eval()
    try:
        return forward(model, x) if forward is not None else model(x)
    finally:
        model.train(was)


def init_projector(module: nn.Module) -> None:
    """OFA-KD's / PAT's initialisation of their projectors (``init_weights`` in both repositories):
    conv weights Kaiming-normal (fan_out, ReLU gain), conv biases left at PyTorch's default,
    BatchNorm2d 1 / 0, Linear weights truncated N(0, 0.02) with zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def target_ce(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The recipes' classification loss: cross entropy with label smoothing against labels [B]
    (timm's ``LabelSmoothingCrossEntropy``); against soft targets [B, K] (mixup / cutmix, whose
    targets carry their own smoothing) the plain soft-target cross entropy (timm's
    ``SoftTargetCrossEntropy``), without smoothing them again."""
    if target.dim() == 2:
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def ofa_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, eps: float,
             temperature: float = 1.0) -> torch.Tensor:
    """OFA's loss, averaged over the batch:
    ``-sum_c [(p_t,c + 1[c=y])^eps - 1[c=y]] * log p_c``, with ``p = softmax(logits / T)`` and
    ``p_t = softmax(teacher_logits / T)`` (the teacher detached). For ``eps = 1`` it is the cross
    entropy with the teacher's probabilities; ``eps > 1`` boosts the target class.

    ``log p`` is ``log_softmax`` (the authors take ``log(softmax)``: equal up to rounding, and
    finite where the softmax underflows).

    Args:
        logits: [B, K], the student's (or a stage head's) logits.
        teacher_logits: [B, K].
        target: labels [B], or soft labels [B, K] (mixup), whose argmax is the class y.
        eps: the target-enhancement exponent.
        temperature: T.

    Returns:
        A 0-d tensor.
    """
    y = target.argmax(dim=1) if target.dim() == 2 else target
    mask = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    log_p = F.log_softmax(logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=1).to(log_p.dtype)
    weight = (p_t + mask) ** eps - mask
    return -(weight * log_p).sum(dim=1).mean()


class SepConv(nn.Module):
    """OFA's downsampling block: depthwise 3x3 stride 2 -> pointwise 1x1 -> BN -> ReLU ->
    depthwise 3x3 -> pointwise 1x1 (to ``out_channels``) -> BN -> ReLU; no conv biases."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        c = in_channels
        self.op = nn.Sequential(
            nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False),
            nn.Conv2d(c, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class PatchMerging(nn.Module):
    """OFA's patch merging on tokens [B, H*W, C]: each 2x2 neighbourhood concatenated (offsets
    (0,0), (1,0), (0,1), (1,1) as (row, col)), LayerNorm(4C), Linear(4C -> out, no bias), then
    ``act`` (GELU or identity)."""

    def __init__(self, side: int, dim: int, out_dim: int, act: bool):
        super().__init__()
        if side % 2:
            raise ValueError(f"OFA patch merging needs an even grid, got {side}x{side}")
        self.side = side
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.reshape(b, self.side, self.side, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x.reshape(b, -1, 4 * c))))


class HeadBlock(nn.Module):
    """timm 0.6.5's default ViT ``Block`` as OFA builds it (``Block(dim, num_heads=4)``): pre-norm
    (LayerNorm eps 1e-5), attention without qkv bias, 4x GELU MLP, residuals."""

    def __init__(self, dim: int, num_heads: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenStageHead(nn.Module):
    """OFA's stage head for a token student: the patch tokens merged down to a 7x7 grid
    (``max(int(log2(side / 7)), 0)`` merges, the first to ``dim_out`` channels), the class tokens
    put back in front, ``max(4 - stage, 1)`` ``HeadBlock``s, then the class token (or the token mean
    when there is none) into a Linear classifier.

    Where no merge happens but the widths differ (inputs below 224 px; OFA's code fails there),
    a Linear projects the tokens to ``dim_out`` instead.

    Args:
        stage: 1-based stage index.
        num_prefix_tokens: the student's class tokens (0 or 1).
        num_tokens: the stage's patch tokens (a square grid).
        dim: the stage's token width.
        dim_out: the student's last-stage width.
        num_classes: logits.
    """

    def __init__(self, stage: int, num_prefix_tokens: int, num_tokens: int, dim: int, dim_out: int, num_classes: int):
        super().__init__()
        if num_prefix_tokens > 1:
            raise ValueError(f"OFA's token head takes at most one class token, got {num_prefix_tokens}")
        side = math.isqrt(num_tokens)
        merges = max(int(math.log2(side / 7)), 0)
        layers = []
        for i in range(merges):
            act = i == 0 or i != merges - 1  # OFA's rule: the first merge always ends in a GELU
            layers.append(PatchMerging(side >> i, dim if i == 0 else dim_out, dim_out, act))
        if not merges and dim != dim_out:
            layers.append(nn.Linear(dim, dim_out))
        self.prefix = num_prefix_tokens
        self.merge = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*[HeadBlock(dim_out) for _ in range(max(4 - stage, 1))])
        self.fc = nn.Linear(dim_out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prefix
        x = torch.cat([x[:, :p], self.merge(x[:, p:])], dim=1) if p else self.merge(x)
        x = self.blocks(x)
        return self.fc(x[:, 0] if p else x.mean(dim=1))


def map_stage_head(stage: int, channels: int, dim_out: int, num_classes: int) -> nn.Sequential:
    """OFA's stage head for a CNN student: ``4 - stage`` :class:`SepConv` blocks doubling the
    channels, the last to ``dim_out`` (stage 4: a 1x1 conv with bias instead), global average
    pool, Linear classifier.

    Args:
        stage: 1-based stage index.
        channels: the stage map's channels.
        dim_out: ``max(student's last-stage channels, teacher's last-stage channels)``.
        num_classes: logits.
    """
    if stage == NUM_STAGES:
        down = [nn.Conv2d(channels, dim_out, 1)]
    else:
        n = NUM_STAGES - stage
        down = [SepConv(channels << i, dim_out if i == n - 1 else channels << (i + 1)) for i in range(n)]
    return nn.Sequential(*down, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim_out, num_classes))


class OFA(OfflineMethod):
    """OFA-KD, per student: ``ce_weight * CE_ls(z_s, y) + kd_weight * ofa(z_s, z_t, eps_logits)
    + ofa_weight * sum_k ofa(head_k(F_s[k]), z_t, eps_k)`` over the student's stages k (1-based
    into its four stage features, :func:`stage_features`), with :func:`ofa_loss` at temperature
    T and the un-prompted teacher in eval mode.

    Stage heads (``heads``): :func:`map_stage_head` for a CNN student (stage maps), with
    ``dim_out = max(student's, teacher's last-stage width)``; :class:`TokenStageHead` for a token
    student, with ``dim_out`` the student's last-stage width. Initialised as the authors'
    (:func:`init_projector`). They are sized for one input size (``img_size``), measured with one
    forward of the student at construction.

    Defaults are the authors' ``train.py``: every weight 1, T = 1, stages 1-4, label smoothing
    0.1; ``eps = 1.0`` on CIFAR (their README's Swin-T -> ResNet-18) and 1.5 on ImageNet (their
    README's DeiT-T -> ResNet-18; no other per-pair value is published; the MobileNetV2 CIFAR runs
    used ``ofa_weight = 0.1``, OFA-KD issue #32).

    Args:
        roles: one teacher, one or more students.
        num_classes: width of the logits.
        models: the models (shapes of the heads).
        ce_weight, kd_weight, ofa_weight: weights of CE, the logit term and the stage-head terms.
        eps: one exponent for every term, or one per stage plus one (last) for the logits.
        temperature: T.
        label_smoothing: of the CE term against labels (soft targets carry their own).
        stages: 1-based stages with a head.
        img_size: the training input side (default: the models' declared ``img_size``).

    Raises:
        ValueError: a stage out of 1..4, ``eps`` of the wrong length, no input size, or a model
            with fewer than four stage features.
    """

    soft_targets = True

    def __init__(self, roles, num_classes, models: Sequence[nn.Module], *, ce_weight=1.0, kd_weight=1.0,
                 ofa_weight=1.0, eps=1.0, temperature=1.0, label_smoothing=0.1, stages=(1, 2, 3, 4),
                 img_size: Optional[int] = None):
        super().__init__(roles, num_classes)
        self.ce_weight, self.kd_weight, self.ofa_weight = float(ce_weight), float(kd_weight), float(ofa_weight)
        self.temperature, self.label_smoothing = float(temperature), float(label_smoothing)
        self.stages = tuple(int(k) for k in stages)
        if not self.stages or any(not 1 <= k <= NUM_STAGES for k in self.stages):
            raise ValueError(f"ofa stages must be in 1..{NUM_STAGES}, got {list(stages)}")
        eps = [float(eps)] * (len(self.stages) + 1) if isinstance(eps, (int, float)) else [float(e) for e in eps]
        if len(eps) != len(self.stages) + 1:
            raise ValueError(f"ofa eps: give one value or {len(self.stages) + 1} (one per stage, then the logits'), "
                             f"got {len(eps)}")
        self.eps = tuple(eps)
        self.img_size = input_size(img_size, models, "ofa")
        dim_t = stage_channels(models[self.teacher], self.teacher)[-1]
        self.heads = nn.ModuleDict()
        for s in self.students:
            student = models[s]
            shapes = [tuple(f.shape[1:]) for f in stage_features(probe(student, self.img_size))]
            dim_s = stage_channels(student, s)[-1]
            prefix = int(getattr(student, "num_prefix_tokens", 0))
            heads = nn.ModuleDict()
            for k in self.stages:
                shape = shapes[k - 1]
                if len(shape) == 3:
                    heads[str(k)] = map_stage_head(k, shape[0], max(dim_s, dim_t), num_classes)
                else:
                    heads[str(k)] = TokenStageHead(k, prefix, shape[0] - prefix, shape[1], dim_s, num_classes)
            init_projector(heads)
            self.heads[str(s)] = heads

    def losses(self, outputs, target, terms):
        z_t = outputs[self.teacher].logits
        for s in self.students:
            z = outputs[s].logits
            feats = stage_features(outputs[s])
            heads = self.heads[str(s)]
            stage_terms = [ofa_loss(heads[str(k)](feats[k - 1]), z_t, target, e, self.temperature)
                           for k, e in zip(self.stages, self.eps)]
            terms[f"ce/{s}"] = self.ce_weight * target_ce(z, target, self.label_smoothing)
            terms[f"kl/{s}"] = self.kd_weight * ofa_loss(z, z_t, target, self.eps[-1], self.temperature)
            terms[f"hint/{s}"] = self.ofa_weight * sum(stage_terms)
        return None
