"""Residual blocks shared by the CIFAR and ImageNet ResNets.

Layer names are torchvision's (and the CIFAR zoo's): conv1/bn1, conv2/bn2, [conv3/bn3],
downsample.0/1. Each block's ``forward`` returns its residual sum *before* the final ReLU;
``utils.run_stage`` applies the ReLU, so a stage's last pre-activation is at hand as its feature
without a second pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def projection(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN shortcut where the shape changes, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = projection(cin, planes, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))


class Bottleneck(nn.Module):
    """torchvision's "ResNet v1.5" bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = projection(cin, planes * 4, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + (x if self.downsample is None else self.downsample(x))


def make_stage(block: type[BasicBlock] | type[Bottleneck], cin: int, planes: int, n: int,
               stride: int) -> nn.Sequential:
    """``n`` blocks, the first one strided (and projecting where the shape changes)."""
    out = planes * block.expansion
    return nn.Sequential(*[block(cin if i == 0 else out, planes, stride if i == 0 else 1) for i in range(n)])
