"""MobileNetV2 in timm's layout: ``mobilenetv2_100`` (width 1.0).

timm builds MobileNetV2 with its EfficientNet builder, so the architecture equals torchvision's
(``mobilenet_v2`` in ``imagenet_mobilenet``, 3,504,872 parameters at 1000 classes, same count)
but the names differ: ``conv_stem``/``bn1``; ``blocks.s.b`` with ``conv_dw``/``bn1``/``conv_pw``/
``bn2`` for the first (depthwise-separable, no expansion) block and ``conv_pw``/``bn1``/
``conv_dw``/``bn2``/``conv_pwl``/``bn3`` for the inverted residuals; ``conv_head``/``bn2``;
``classifier``. This module has those names, so timm checkpoints load with ``strict=True``.

Architecture: 3x3 s2 stem (32) + BN + ReLU6; stages of (expansion, channels, blocks, stride)
(1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), 3x3 depthwise
convs, linear bottlenecks, a residual where shape allows; 1x1 conv to 1280 + BN + ReLU6; global
average pool; ``classifier``. Stochastic depth on the residual blocks, block k of 17 at
``drop_path_rate * k / 17`` (timm's rule). Initialisation as timm's (TensorFlow's): conv
weights N(0, sqrt(2 / fan_out)) with fan_out = k*k*C_out/groups, Linear weights
U(+-1/sqrt(num_classes)), zero biases, BN 1 / 0.

Features (the CNN contract of ``imagenet_mobilenet.mobilenet_v2``, at the same places): the
stem's BN output as ``min(x, 6)``; the outputs of flat blocks 2, 5 and 12 (24, 32, 96 channels at
H/4, H/8, H/16; linear bottlenecks, taken as they are); the head conv's BN output as
``min(x, 6)`` (1280 at H/32). ``relu(min(x, 6)) == relu6(x)``, so the network continues from the
ReLU of each entry (the stem, the head conv; the bottleneck outputs feed the next block as they
are) and ``head`` takes the GAP of ``relu(features[-1])``.

Hints (FitNet's taps): ``relu(stem)``, the three bottleneck outputs as they are (``relu`` would
clip them), ``relu(features[-1])``. Hints 1-4 are PAT's MobileNetV2 stage features (its blocks 2,
5, 12 and the ReLU6 head conv).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel, ModelOutput, register_model
from .layers import DropPath
from .utils import global_pool, pre_relu6

# expansion t, output channels c, blocks n, first stride s
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
FEATURE_BLOCKS = (2, 5, 12)  # flat (0-based) block indices whose outputs are features 1-3



def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN (linear); residual where shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = _conv(cin, cin, 3, stride, groups=cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.has_skip = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return x + self.drop_path(y) if self.has_skip else y


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 project + BN (linear); residual
    where shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, drop_path: float = 0.0):
        super().__init__()
        mid = cin * expand
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = _conv(mid, mid, 3, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout)
        self.has_skip = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = self.bn3(self.conv_pwl(F.relu6(self.bn2(self.conv_dw(y)))))
        return x + self.drop_path(y) if self.has_skip else y


class TimmMobileNetV2(KDModel):
    """MobileNetV2 (width 1.0) with timm's module names.

    Args:
        num_classes: width of the logits.
        img_size: input side used for ``stage_shapes`` (the network accepts any size).
        drop_path_rate: stochastic depth reached at the (virtual) 18th block; timm's k/17 ramp.
    """

    feature_format = "nchw"

    def __init__(self, num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        self.conv_stem = _conv(3, 32, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(32)
        total = sum(n for _, _, n, _ in _SETTING)
        stages, cin, k = [], 32, 0
        channels = []
        for t, c, n, s in _SETTING:
            blocks = []
            for i in range(n):
                stride = s if i == 0 else 1
                rate = drop_path_rate * k / total
                blocks.append(DepthwiseSeparable(cin, c, stride, rate) if t == 1 else
                              InvertedResidual(cin, c, stride, t, rate))
                cin, k = c, k + 1
                channels.append(c)
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(cin, 1280, 1)
        self.bn2 = nn.BatchNorm2d(1280)
        self.classifier = nn.Linear(1280, num_classes)
        self.stage_channels = (32, *(channels[i] for i in FEATURE_BLOCKS), 1280)
        # strides of the stem, of the tapped blocks and of the head: H/2, H/4, H/8, H/16, H/32
        sides = [-(-img_size // 2 ** j) for j in range(1, 6)]
        self.stage_shapes = tuple((c, s, s) for c, s in zip(self.stage_channels, sides))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def pre_logits(self, last: torch.Tensor) -> torch.Tensor:
        """The classifier's input from ``features[-1]``: GAP of its ReLU (== GAP of relu6 of the
        head conv's BN output)."""
        return global_pool(F.relu(last))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        stem = pre_relu6(self.bn1(self.conv_stem(x)))
        feats = [stem]
        x = F.relu(stem)
        k = 0
        for stage in self.blocks:
            for block in stage:
                x = block(x)
                if k in FEATURE_BLOCKS:
                    feats.append(x)
                k += 1
        last = pre_relu6(self.bn2(self.conv_head(x)))
        feats.append(last)
        act = F.relu(last)
        hints = [F.relu(stem), *feats[1:-1], act]
        return ModelOutput(self.classifier(global_pool(act)), feats, hints=hints)


@register_model
def mobilenetv2_100(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.0,
                    **kwargs) -> TimmMobileNetV2:
    """MobileNetV2 1.0 in timm's layout (timm ``mobilenetv2_100``; torchvision's is ``mobilenet_v2``)."""
    return TimmMobileNetV2(num_classes, img_size, drop_path_rate, **kwargs)
