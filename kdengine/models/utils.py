"""Small helpers shared by the model families."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (the figure papers and torchvision quote)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding for width multipliers: nearest multiple of ``divisor``,
    at least ``divisor``, and never more than 10 % below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def pre_relu6(x: torch.Tensor) -> torch.Tensor:
    """The part of ReLU6 before its ReLU: ``relu(pre_relu6(x)) == relu6(x)``, so a MobileNet stage
    can report a pre-ReLU feature and continue from its ReLU like every other family."""
    return x.clamp(max=6.0)


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C]. Adaptive, so any input size works (the CIFAR zoo's fixed
    AvgPool2d(8)/(4) equal this at 32 px)."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def run_stage(blocks: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run blocks whose ``forward`` returns its pre-activation, applying the ReLU between them.

    Returns ``(pre, relu(pre))`` of the last block: the stage's feature and what the network
    continues from.
    """
    pre = x
    for block in blocks:
        pre = block(x)
        x = F.relu(pre)
    return pre, x


def init_weights(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Kaiming-normal (fan_out, ReLU gain) convs with zero bias, BN weight 1 / bias 0 (as
    torchvision and the CIFAR zoo; the zoo's ``normal_(0, sqrt(2 / (k*k*C_out)))`` is the same
    distribution). Linear layers keep PyTorch's default unless ``linear_std`` (weights drawn from
    N(0, linear_std), bias zeroed) or ``zero_linear_bias`` is given."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None and (linear_std is not None or zero_linear_bias):
                nn.init.zeros_(m.bias)
