"""ImageNet ResNets, torchvision-compatible: resnet18/34/50/101/152 (and CIFAR-stem variants).

Same layers, names and initialisation as ``torchvision.models.resnet*`` (v1.5 bottleneck:
stride on the 3x3 conv), so torchvision checkpoints load unchanged with ``strict=True`` and the
parameter counts are torchvision's (resnet18 11,689,512 ... resnet152 60,192,808 at 1000 classes).
``zero_init_residual=True`` zeroes each block's last BN weight, as torchvision's option.

Features (5 entries): the stem's BN output (before ReLU and max-pool, H/2), then the last residual
sum of layer1-4 before its ReLU (H/4, H/8, H/16, H/32); ``stage_channels`` = (64, 64e, 128e,
256e, 512e) with e = 1 (basic) or 4 (bottleneck). This is mdistiller's ImageNet ``preact_feats``;
no ``hints``, as its ``feats`` (and those of the CIFAR zoo's ``resnetv2.py``) are their ReLUs.

``resnet18_cifar`` / ``resnet50_cifar`` are the CRD zoo's "ResNet18"/"ResNet50" for 32 px input
(3x3 stride-1 stem, no max-pool; the paper's CIFAR ResNet-50 teacher), same parameter counts as
the zoo's; they keep torchvision's names, and ``load_pretrained`` renames the zoo's ``shortcut``
-> ``downsample`` and ``linear`` -> ``fc``, so its released teachers load as they are. The
``_cifar`` suffix keeps them apart from the ImageNet names (the CIFAR ``resnet8`` ... ``resnet110``
have no ImageNet namesakes).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel, ModelOutput, register_model
from .resnet_blocks import BasicBlock, Bottleneck, make_stage
from .utils import global_pool, init_weights, run_stage


class ResNet(KDModel):
    """torchvision's ResNet, optionally with the CIFAR zoo's stem.

    Args:
        block: ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50 and deeper).
        depths: blocks in layer1-4.
        num_classes: width of the logits.
        zero_init_residual: zero each block's last BN weight (torchvision's option).
        cifar_stem: 3x3 stride-1 stem conv and no max-pool (32 px input) instead of the 7x7
            stride-2 conv and max-pool.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, int, int, int],
                 num_classes: int = 1000, zero_init_residual: bool = False, cifar_stem: bool = False):
        super().__init__()
        e = block.expansion
        self.num_classes = num_classes
        self.stage_channels = (64, 64 * e, 128 * e, 256 * e, 512 * e)
        self.cifar_stem = cifar_stem
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = make_stage(block, 64, 64, depths[0], stride=1)
        self.layer2 = make_stage(block, 64 * e, 128, depths[1], stride=2)
        self.layer3 = make_stage(block, 128 * e, 256, depths[2], stride=2)
        self.layer4 = make_stage(block, 256 * e, 512, depths[3], stride=2)
        self.fc = nn.Linear(512 * e, num_classes)
        init_weights(self)  # torchvision leaves fc at PyTorch's default
        if zero_init_residual:  # each residual branch starts at zero: blocks begin as identities
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    @property
    def head(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> ModelOutput:
        stem = self.bn1(self.conv1(x))
        x = F.relu(stem)
        if not self.cifar_stem:
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        f1, x = run_stage(self.layer1, x)
        f2, x = run_stage(self.layer2, x)
        f3, x = run_stage(self.layer3, x)
        f4, x = run_stage(self.layer4, x)
        return ModelOutput(self.fc(global_pool(x)), [stem, f1, f2, f3, f4])


# block and blocks per stage (layer1-4) of each depth
_CONFIGS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


@register_model
def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18, ImageNet (torchvision's layout)."""
    return ResNet(*_CONFIGS[18], num_classes, **kwargs)


@register_model
def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-34, ImageNet (torchvision's layout)."""
    return ResNet(*_CONFIGS[34], num_classes, **kwargs)


@register_model
def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50, ImageNet (torchvision's layout)."""
    return ResNet(*_CONFIGS[50], num_classes, **kwargs)


@register_model
def resnet101(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-101, ImageNet (torchvision's layout)."""
    return ResNet(*_CONFIGS[101], num_classes, **kwargs)


@register_model
def resnet152(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-152, ImageNet (torchvision's layout)."""
    return ResNet(*_CONFIGS[152], num_classes, **kwargs)


@register_model
def resnet18_cifar(num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-18 with the CIFAR stem: the CRD / mdistiller zoo's "ResNet18"."""
    return ResNet(*_CONFIGS[18], num_classes, cifar_stem=True, **kwargs)


@register_model
def resnet50_cifar(num_classes: int = 100, **kwargs) -> ResNet:
    """ResNet-50 with the CIFAR stem: the CRD / mdistiller zoo's "ResNet50"."""
    return ResNet(*_CONFIGS[50], num_classes, cifar_stem=True, **kwargs)
