"""CIFAR ShuffleNets of the CRD / mdistiller zoo: ``shufflenetv1`` (g=3) and ``shufflenetv2`` (1x).

Both use the zoo's CIFAR stem (1x1 conv to 24 channels, BN, ReLU, no down-sampling) and three
stages that each halve the resolution (32 -> 16 -> 8 -> 4 px). Parameter counts and module names
equal the zoo's (``ShuffleV1`` 949,258; ``ShuffleV2`` 1,355,528 at 100 classes), so its checkpoints
load with ``strict=True``; the classifier is ``linear``.

- ShuffleNetV1: stage widths 240, 480, 960; 4, 8, 4 bottlenecks; features (4 entries,
  ``stage_channels`` = (24, 240, 480, 960)): stem BN output and each stage's last block sum, all
  before ReLU (mdistiller's ``preact_feats``, whose stem entry is after ReLU).
- ShuffleNetV2: stage widths 116, 232, 464 (3, 7, 3 basic blocks after a down-sampling block),
  then a 1x1 conv to 1024 + BN + ReLU before the pool. Features (4 entries, ``stage_channels`` =
  (24, 116, 232, 1024)): stem BN output; stage 1 and 2 outputs before their ReLU, i.e.
  ``shuffle(cat(x1, branch))`` with the branch's last BN output (mdistiller keeps the same channels
  unshuffled); and, as the last entry, the 1024-channel BN output of the final 1x1 conv, which we
  count as part of stage 3 so that ``linear`` pools the ReLU of the last entry (mdistiller's last
  entry is stage 3's 464-channel map).

Every block returns its pre-activation and ``run_stage`` applies the ReLU. This is exact because
every concatenated passthrough part is already a ReLU output (non-negative) and channel shuffles
commute with ReLU.

No ``hints``: mdistiller's ``feats`` are ``relu(features[i])`` entry for entry (for ShuffleNetV2
the shuffled stage outputs, which equal its ``cat(x1, relu(branch))`` then shuffle), except
ShuffleNetV2's last tap, stage 3's 464-channel output, which has no counterpart with the last
entry's 1024 channels; FitNet gets ``relu(features[-1])`` there.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel, ModelOutput, register_model
from .utils import global_pool, init_weights, run_stage


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, g*k, H, W] -> [B, k*g, H, W], interleaving the groups."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; stride 2 concatenates an
    avg-pooled shortcut (so it adds ``cin`` channels), stride 1 adds the identity."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = cout // 4
        self.first_groups = 1 if cin == 24 else groups  # the stem's 24 channels are not grouped
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        return out + x


class ShuffleV2Block(nn.Module):
    """Split the channels in half; 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN on the second half."""

    def __init__(self, channels: int):
        super().__init__()
        self.half = channels // 2
        c = channels - self.half
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.half], x[:, self.half :]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        return channel_shuffle(torch.cat([x1, self.bn3(self.conv3(out))], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches, each ending in 1x1-BN(-ReLU), concatenated and shuffled."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        # left: depthwise 3x3 s2-BN, 1x1-BN
        self.conv1 = nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1x1-BN-ReLU, depthwise 3x3 s2-BN, 1x1-BN
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = self.bn5(self.conv5(right))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV1(KDModel):
    def __init__(self, num_classes: int = 100, widths=(240, 480, 960), depths=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.stage_channels = (24, *widths)
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (width, n) in enumerate(zip(widths, depths), 1):
            # the strided first block concatenates its input, so its branch makes width - cin
            blocks = [ShuffleV1Block(cin, width - cin, 2, groups)]
            blocks += [ShuffleV1Block(width, width, 1, groups) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.linear = nn.Linear(cin, num_classes)
        init_weights(self)

    @property
    def head(self) -> nn.Module:
        return self.linear

    def forward(self, x: torch.Tensor) -> ModelOutput:
        stem = self.bn1(self.conv1(x))
        f1, x = run_stage(self.layer1, F.relu(stem))
        f2, x = run_stage(self.layer2, x)
        f3, x = run_stage(self.layer3, x)
        return ModelOutput(self.linear(global_pool(x)), [stem, f1, f2, f3])


class ShuffleNetV2(KDModel):
    def __init__(self, num_classes: int = 100, widths=(116, 232, 464), depths=(3, 7, 3), last: int = 1024):
        super().__init__()
        self.num_classes = num_classes
        self.stage_channels = (24, widths[0], widths[1], last)
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (width, n) in enumerate(zip(widths, depths), 1):
            blocks = [ShuffleV2DownBlock(cin, width)] + [ShuffleV2Block(width) for _ in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.conv2 = nn.Conv2d(cin, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)
        init_weights(self)

    @property
    def head(self) -> nn.Module:
        return self.linear

    def forward(self, x: torch.Tensor) -> ModelOutput:
        stem = self.bn1(self.conv1(x))
        f1, x = run_stage(self.layer1, F.relu(stem))
        f2, x = run_stage(self.layer2, x)
        _, x = run_stage(self.layer3, x)
        f3 = self.bn2(self.conv2(x))
        return ModelOutput(self.linear(global_pool(F.relu(f3))), [stem, f1, f2, f3])


@register_model
def shufflenetv1(num_classes: int = 100) -> ShuffleNetV1:
    """CIFAR ShuffleNetV1, 3 groups (the zoo's ``ShuffleV1``)."""
    return ShuffleNetV1(num_classes)


@register_model
def shufflenetv2(num_classes: int = 100) -> ShuffleNetV2:
    """CIFAR ShuffleNetV2 1x (the zoo's ``ShuffleV2``)."""
    return ShuffleNetV2(num_classes)
