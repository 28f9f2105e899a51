"""CIFAR MobileNetV2 of the CRD / mdistiller zoo: ``mobilenetv2`` (width 1.0) and
``mobilenetv2_0_5`` (width 0.5).

``mobilenetv2_0_5`` is the zoo's ``mobile_half``, the model the CRD/DKD/ADM CIFAR-100 tables call
"MobileNetV2" or "0.5MobileNetV2" (812,836 parameters at 100 classes). ``mobilenetv2`` takes a
``width_mult`` keyword (default 1.0; 2,353,060 parameters). The ImageNet (torchvision) model is
``mobilenet_v2`` in ``imagenet_mobilenet``.

Zoo layout, which differs from torchvision's: ReLU (not ReLU6); the stem is a stride-2 3x3 conv and
the stages' strides are 1, 1, 2, 2, 1, 2, 1, so 32 px input ends at 2x2; every block has its 1x1
expansion conv, the t=1 one included; widths ``int(c * width_mult)``, last conv 1280 channels unless
``width_mult > 1``. Module names equal the zoo's (``conv1``, ``blocks.i.j.conv.k``, ``conv2``,
``classifier.0``), so its checkpoints load with ``strict=True``.

Features (5 entries, ``stage_channels`` = (32w, 24w, 32w, 96w, 1280)): the stem's BN output
before ReLU; the outputs of blocks 1, 2 and 4 (mdistiller's feats 1-3, at 16, 8 and 4 px); the
last 1x1 conv's BN output before ReLU (2 px), which is what ``classifier`` pools. Exception to the
"pre-ReLU" rule: entries 1-3 are linear-bottleneck outputs that no ReLU follows, and the network
continues from them as they are. mdistiller's last entry is block 6's 320-channel output; we end
at the 1280-channel map instead so ADM's attention pool goes through ``classifier``.

Hints (FitNet's taps, mdistiller's ``feats``): ``relu(stem)``, then the bottleneck outputs of
blocks 1, 2 and 4 as they are (``relu`` of them would clip the linear bottlenecks), then
``relu(features[-1])``: mdistiller's last tap, block 6's 320-channel output, has no counterpart
with the last entry's 1280 channels (FitNet's usual ``hint_layer=2`` is unaffected).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel, ModelOutput, register_model
from .utils import global_pool, init_weights

# expansion t, output channels c, blocks n, first stride s (the zoo's CIFAR strides)
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, hidden, 1), nn.ReLU(inplace=True),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU(inplace=True),
            *_conv_bn(hidden, cout, 1),  # linear bottleneck: no activation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(KDModel):
    """The CIFAR zoo's MobileNetV2.

    Args:
        num_classes: width of the logits.
        width_mult: width multiplier (widths ``int(c * width_mult)``).
    """

    def __init__(self, num_classes: int = 100, width_mult: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        cin = int(32 * width_mult)
        self.conv1 = nn.Sequential(*_conv_bn(3, cin, 3, stride=2))
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            cout = int(c * width_mult)
            self.blocks.append(nn.Sequential(*[InvertedResidual(cin if i == 0 else cout, cout, s if i == 0 else 1, t)
                                               for i in range(n)]))
            cin = cout
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn(cin, last, 1))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.stage_channels = (int(32 * width_mult), int(24 * width_mult), int(32 * width_mult),
                               int(96 * width_mult), last)
        init_weights(self, linear_std=0.01)

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> ModelOutput:
        b = self.blocks
        stem = self.conv1(x)
        act = F.relu(stem)
        f1 = b[1](b[0](act))
        f2 = b[2](f1)
        f3 = b[4](b[3](f2))
        last = self.conv2(b[6](b[5](f3)))
        pooled = F.relu(last)
        return ModelOutput(self.classifier(global_pool(pooled)), [stem, f1, f2, f3, last],
                           hints=[act, f1, f2, f3, pooled])


@register_model
def mobilenetv2(num_classes: int = 100, width_mult: float = 1.0) -> CifarMobileNetV2:
    """CIFAR MobileNetV2 (CRD zoo layout), width ``width_mult``."""
    return CifarMobileNetV2(num_classes, width_mult)


@register_model
def mobilenetv2_0_5(num_classes: int = 100) -> CifarMobileNetV2:
    """The zoo's ``mobile_half``: the CIFAR tables' "MobileNetV2"."""
    return CifarMobileNetV2(num_classes, 0.5)
