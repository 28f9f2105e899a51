"""Wide ResNets of the CRD / mdistiller zoo: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, wrn_16_10.

Pre-activation network (BN-ReLU-conv units): 3x3 stem, three stages (``block1``-``block3``, strides
1, 2, 2) of (depth - 4) / 6 units, widths 16k, 32k, 64k, then BN-ReLU, global pool, ``fc``.
No dropout (the zoo's setting). Parameter counts equal the zoo's (wrn_40_2: 2,255,156 at 100
classes); module names too, so its checkpoints load with ``strict=True``.

Features (4 entries, ``stage_channels`` = (16, 16k, 32k, 64k)): in a pre-activation net a stage's
output is followed by the *next* unit's BN and then ReLU, so a stage's pre-ReLU feature is that
BN's output: ``block2.layer[0].bn1(stage1)``, ``block3.layer[0].bn1(stage2)`` and the final
``bn1(stage3)`` (exactly mdistiller's ``preact_feats``). The network continues from their ReLU: the
first unit of block2/block3 changes width, so its shortcut takes the activated input too, and
we compute each of these BNs once. Entry 0 is the raw stem conv output (as in mdistiller): no ReLU
follows it directly, but ADM's L_feat skips entry 0.

Hints (FitNet's taps, mdistiller's ``feats``): the raw stem conv output and the raw outputs of
block1-3 (the residual sums, before any BN or ReLU), not ``relu(features[i])``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel, ModelOutput, register_model
from .utils import global_pool, init_weights


class WideUnit(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut; a 1x1 ``convShortcut`` on the activated
    input where the width changes (the zoo's naming)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.equal_in_out = cin == cout
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def residual(self, act: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(act))))

    def from_activation(self, act: torch.Tensor) -> torch.Tensor:
        """The unit given ``relu(bn1(x))`` already (only for width-changing units)."""
        return self.convShortcut(act) + self.residual(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        if self.equal_in_out:
            return x + self.residual(act)
        return self.from_activation(act)


class WideStage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideUnit(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def from_activation(self, act: torch.Tensor) -> torch.Tensor:
        x = self.layer[0].from_activation(act)
        for unit in self.layer[1:]:
            x = unit(x)
        return x


class WideResNet(KDModel):
    """A pre-activation Wide ResNet.

    Args:
        depth: 6n + 4 (n units per stage).
        widen: widen factor k (stage widths 16k, 32k, 64k).
        num_classes: width of the logits.
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        c = (16, 16 * widen, 32 * widen, 64 * widen)
        self.num_classes = num_classes
        self.stage_channels = c
        self.conv1 = nn.Conv2d(3, c[0], 3, padding=1, bias=False)
        self.block1 = WideStage(n, c[0], c[1], 1)
        self.block2 = WideStage(n, c[1], c[2], 2)
        self.block3 = WideStage(n, c[2], c[3], 2)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = nn.Linear(c[3], num_classes)
        init_weights(self, zero_linear_bias=True)

    @property
    def head(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> ModelOutput:
        stem = self.conv1(x)
        s1 = self.block1(stem)
        f1 = self.block2.layer[0].bn1(s1)
        s2 = self.block2.from_activation(F.relu(f1))
        f2 = self.block3.layer[0].bn1(s2)
        s3 = self.block3.from_activation(F.relu(f2))
        f3 = self.bn1(s3)
        return ModelOutput(self.fc(global_pool(F.relu(f3))), [stem, f1, f2, f3], hints=[stem, s1, s2, s3])


@register_model
def wrn_16_1(num_classes: int = 100, **kwargs) -> WideResNet:
    """WRN-16-1 (CIFAR): depth 16, widen factor 1."""
    return WideResNet(16, 1, num_classes, **kwargs)


@register_model
def wrn_16_2(num_classes: int = 100, **kwargs) -> WideResNet:
    """WRN-16-2 (CIFAR): depth 16, widen factor 2."""
    return WideResNet(16, 2, num_classes, **kwargs)


@register_model
def wrn_40_1(num_classes: int = 100, **kwargs) -> WideResNet:
    """WRN-40-1 (CIFAR): depth 40, widen factor 1."""
    return WideResNet(40, 1, num_classes, **kwargs)


@register_model
def wrn_40_2(num_classes: int = 100, **kwargs) -> WideResNet:
    """WRN-40-2 (CIFAR): depth 40, widen factor 2."""
    return WideResNet(40, 2, num_classes, **kwargs)


@register_model
def wrn_16_10(num_classes: int = 100, **kwargs) -> WideResNet:
    """WRN-16-10 (CIFAR): depth 16, widen factor 10."""
    return WideResNet(16, 10, num_classes, **kwargs)
