"""CIFAR ResNets of the CRD / mdistiller zoo: resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4.

3x3 stem at full resolution, three stages of BasicBlocks (strides 1, 2, 2), global average pool,
``fc``. Depth = 6n + 2 (n blocks per stage). Widths (stem, stage 1-3): 16, 16, 32, 64; the "x4"
models 32, 64, 128, 256. Parameter counts equal the zoo's (e.g. resnet56 861,620 and
resnet32x4 7,433,860 at 100 classes).

Features (4 entries, ``stage_channels`` = the widths above): the stem's BN output, then each
stage's last residual sum, all before their ReLU; at 32 px they are 32, 32, 16, 8 px. This is
mdistiller's ``preact_feats`` list (whose stem entry is taken after the ReLU instead): entry 0 is
the stem that ADM's L_feat skips, and FitNet's usual ``hint_layer=2`` names the same map. No
``hints``: mdistiller's ``feats`` are ``relu(features[i])`` entry for entry.

Module names equal the zoo's, so its released CIFAR-100 teacher checkpoints (resnet56, resnet110,
resnet32x4) load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel, ModelOutput, register_model
from .resnet_blocks import BasicBlock, make_stage
from .utils import global_pool, init_weights, run_stage


class CifarResNet(KDModel):
    """A CIFAR ResNet of BasicBlocks.

    Args:
        depth: 6n + 2 (n blocks per stage).
        widths: channels of the stem and of stages 1-3.
        num_classes: width of the logits.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.stage_channels = tuple(widths)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = make_stage(BasicBlock, widths[0], widths[1], n, stride=1)
        self.layer2 = make_stage(BasicBlock, widths[1], widths[2], n, stride=2)
        self.layer3 = make_stage(BasicBlock, widths[2], widths[3], n, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    @property
    def head(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> ModelOutput:
        stem = self.bn1(self.conv1(x))
        f1, x = run_stage(self.layer1, F.relu(stem))
        f2, x = run_stage(self.layer2, x)
        f3, x = run_stage(self.layer3, x)
        return ModelOutput(self.fc(global_pool(x)), [stem, f1, f2, f3])


_NARROW = (16, 16, 32, 64)  # stem, stage 1-3 widths of resnet8 ... resnet110
_WIDE = (32, 64, 128, 256)  # the "x4" models


@register_model
def resnet8(num_classes: int = 100, **kwargs) -> CifarResNet:
    """CIFAR ResNet-8, widths 16, 16, 32, 64."""
    return CifarResNet(8, _NARROW, num_classes, **kwargs)


@register_model
def resnet14(num_classes: int = 100, **kwargs) -> CifarResNet:
    """CIFAR ResNet-14, widths 16, 16, 32, 64."""
    return CifarResNet(14, _NARROW, num_classes, **kwargs)


@register_model
def resnet20(num_classes: int = 100, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20, widths 16, 16, 32, 64."""
    return CifarResNet(20, _NARROW, num_classes, **kwargs)


@register_model
def resnet32(num_classes: int = 100, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32, widths 16, 16, 32, 64."""
    return CifarResNet(32, _NARROW, num_classes, **kwargs)


@register_model
def resnet44(num_classes: int = 100, **kwargs) -> CifarResNet:
    """CIFAR ResNet-44, widths 16, 16, 32, 64."""
    return CifarResNet(44, _NARROW, num_classes, **kwargs)


@register_model
def resnet56(num_classes: int = 100, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56, widths 16, 16, 32, 64."""
    return CifarResNet(56, _NARROW, num_classes, **kwargs)


@register_model
def resnet110(num_classes: int = 100, **kwargs) -> CifarResNet:
    """CIFAR ResNet-110, widths 16, 16, 32, 64."""
    return CifarResNet(110, _NARROW, num_classes, **kwargs)


@register_model
def resnet8x4(num_classes: int = 100, **kwargs) -> CifarResNet:
    """CIFAR ResNet-8, four times wider: widths 32, 64, 128, 256."""
    return CifarResNet(8, _WIDE, num_classes, **kwargs)


@register_model
def resnet32x4(num_classes: int = 100, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32, four times wider: widths 32, 64, 128, 256."""
    return CifarResNet(32, _WIDE, num_classes, **kwargs)
