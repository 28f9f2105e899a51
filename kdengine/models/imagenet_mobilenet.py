"""ImageNet MobileNets: ``mobilenetv1`` and ``mobilenet_v2`` (torchvision's layout and name).

``mobilenet_v2``: same layers, names (``features.N...``, ``classifier.1``), initialisation and
channel rounding as ``torchvision.models.mobilenet_v2``, so its checkpoints load unchanged and the
parameter count is torchvision's (3,504,872 at width 1.0, 1000 classes). ``width_mult`` scales the
widths with torchvision's rounding to multiples of 8 (0.5 gives the paper's "0.5MobileNetV2",
1.97 M parameters). Its activation is ReLU6; ADM pools ``relu(feature)``, so the stem and the last
entry are reported as ``min(x, 6)`` of the BN output (``relu(min(x, 6)) == relu6(x)``): the
network continues from the ReLU of those entries, exactly like the ReLU networks.
Features (5 entries, at H/2, H/4, H/8, H/16, H/32 like the ImageNet ResNets): stem; outputs of
``features[3]``, ``[6]``, ``[13]`` (24, 32, 96 channels x width: linear bottlenecks that no
activation follows, taken as they are); the last 1x1 conv (1280). ``stage_channels`` accordingly.

``mobilenetv1``: the 28-layer MobileNet (stem + 13 depthwise-separable blocks, ReLU), as in
mdistiller's ImageNet zoo (``model.N`` names, ``fc``); 4,231,976 parameters at 1000 classes. We
initialise it like torchvision's MobileNetV2 (the zoo uses PyTorch defaults). ``width_mult``
scales every width by ``int(c * width_mult)`` (the paper's alpha). Features (5 entries, the
ResNets' resolutions): the stem's BN output and the last pointwise BN output of blocks 3, 5, 11
and 13 (128, 256, 512, 1024 channels; mdistiller's ``preact_feats`` plus the stem), all pre-ReLU.

Neither reports ``hints``: FitNet takes ``relu(features[i])``, which are mdistiller's ``feats``
for ``mobilenetv1``; for ``mobilenet_v2`` no CIFAR-KD code lists taps (relu clips its linear
bottleneck entries 1-3).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel, ModelOutput, register_model
from .utils import global_pool, init_weights, make_divisible, pre_relu6


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]



class InvertedResidual(nn.Module):
    """torchvision's block: [1x1 expand-BN-ReLU6], depthwise 3x3-BN-ReLU6, 1x1-BN (linear);
    the expansion is skipped for t=1, which shifts the Sequential's indices as in torchvision."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(nn.Sequential(*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)))
        layers += [nn.Sequential(*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)),
                   *_conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# expansion t, output channels c, blocks n, first stride s (torchvision's ImageNet setting)
_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))
_V2_STAGE_ENDS = (3, 6, 13)  # indices in ``features`` whose outputs are features 1-3


class MobileNetV2(KDModel):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        self.num_classes = num_classes
        cin = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, cin, 3, stride=2))]  # its ReLU6 is in forward
        widths = [cin]
        for t, c, n, s in _V2_SETTING:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            widths.append(cout)
        layers.append(nn.Sequential(*_conv_bn(cin, last, 1)))  # its ReLU6 is in forward
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self.stage_channels = (widths[0], widths[2], widths[3], widths[5], last)
        init_weights(self, linear_std=0.01)

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> ModelOutput:
        f = self.features
        stem = pre_relu6(f[0](x))
        feats = [stem]
        x = F.relu(stem)
        start = 1
        for end in _V2_STAGE_ENDS:
            for i in range(start, end + 1):
                x = f[i](x)
            feats.append(x)
            start = end + 1
        for i in range(start, len(f) - 1):
            x = f[i](x)
        last = pre_relu6(f[-1](x))
        feats.append(last)
        return ModelOutput(self.classifier(global_pool(F.relu(last))), feats)


# (output channels, stride) of the 13 depthwise-separable blocks
_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
              (512, 1), (512, 1), (1024, 2), (1024, 1))
_V1_STAGE_ENDS = (3, 5, 11, 13)  # indices in ``model`` whose pre-ReLU outputs are features 1-4


class MobileNetV1(KDModel):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        cin = int(32 * width_mult)
        # Each ``model.N`` ends with its BN; forward applies the ReLU, so every block's pre-ReLU
        # output is at hand (ReLU modules hold no state: the names stay the zoo's).
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, cin, 3, stride=2))]
        for c, s in _V1_BLOCKS:
            cout = int(c * width_mult)
            layers.append(nn.Sequential(*_conv_bn(cin, cin, 3, s, groups=cin), nn.ReLU(inplace=True),
                                        *_conv_bn(cin, cout, 1)))
            cin = cout
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        self.stage_channels = (int(32 * width_mult), *(int(_V1_BLOCKS[i - 1][0] * width_mult) for i in _V1_STAGE_ENDS))
        init_weights(self, linear_std=0.01)

    @property
    def head(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> ModelOutput:
        feats = []
        for i, block in enumerate(self.model):
            pre = block(x)
            if i == 0 or i in _V1_STAGE_ENDS:
                feats.append(pre)
            x = F.relu(pre)
        return ModelOutput(self.fc(global_pool(x)), feats)


@register_model
def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    """ImageNet MobileNetV2, torchvision's layout (the CIFAR one is ``mobilenetv2``)."""
    return MobileNetV2(num_classes, width_mult, dropout)


@register_model
def mobilenetv1(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV1:
    """ImageNet MobileNetV1 (mdistiller's layout)."""
    return MobileNetV1(num_classes, width_mult)
