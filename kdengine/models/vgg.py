"""CIFAR VGGs with BatchNorm of the CRD / mdistiller zoo: vgg8, vgg11, vgg13, vgg16, vgg19.

Five stages (``block0``-``block4``) of conv3x3(+bias)-BN-ReLU layers, 2x2 max-pool after stages 0-2
(32 -> 16 -> 8 -> 4 px; stage 4 stays at 4 px), global average pool, one linear ``classifier``
(512 -> classes). Layer widths per stage: vgg8 [64] [128] [256] [512] [512]; vgg11/13/16/19 the
usual A/B/D/E configurations. These are the zoo's ``vgg*_bn`` (its ``vgg8``/``vgg13`` in the CRD
tables); parameter counts and module names equal the zoo's (vgg13: 9,462,180 at 100 classes), so
its checkpoints load with ``strict=True``. The zoo's extra max-pool after stage 3 for 64 px input
(Tiny-ImageNet) is not carried over.

Features (5 entries, ``stage_channels`` = (64, 128, 256, 512, 512)): each stage's last BN output,
before its ReLU (mdistiller's ``preact_feats``, whose stem entry is after the ReLU); the network
continues from their ReLU (max-pool commutes with ReLU, so we pool first). No ``hints``:
mdistiller's ``feats`` are ``relu(features[i])`` (before the pools) entry for entry.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel, ModelOutput, register_model
from .utils import global_pool, init_weights

# conv widths of stages 0-4 (vgg11/13/16/19: the A/B/D/E configurations)
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _stage(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv-BN-ReLU layers; the last ReLU is left to ``forward`` so the stage ends pre-ReLU."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(KDModel):
    """A CIFAR VGG with BatchNorm.

    Args:
        config: conv widths of each of the five stages (``_CONFIGS``).
        num_classes: width of the logits.
    """

    def __init__(self, config: tuple[tuple[int, ...], ...], num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.stage_channels = tuple(widths[-1] for widths in config)
        cin = 3
        for i, widths in enumerate(config):
            self.add_module(f"block{i}", _stage(cin, widths))
            cin = widths[-1]
        self.classifier = nn.Linear(cin, num_classes)
        init_weights(self, linear_std=0.01)

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> ModelOutput:
        blocks = (self.block0, self.block1, self.block2, self.block3, self.block4)
        features = []
        for i, block in enumerate(blocks):
            pre = block(x)
            features.append(pre)
            x = F.max_pool2d(pre, 2) if i < 3 else pre
            x = F.relu(x)
        return ModelOutput(self.classifier(global_pool(x)), features)


@register_model
def vgg8(num_classes: int = 100, **kwargs) -> VGG:
    """CIFAR VGG8 with BatchNorm (the zoo's ``vgg8_bn``)."""
    return VGG(_CONFIGS["vgg8"], num_classes, **kwargs)


@register_model
def vgg11(num_classes: int = 100, **kwargs) -> VGG:
    """CIFAR VGG11 with BatchNorm (the zoo's ``vgg11_bn``)."""
    return VGG(_CONFIGS["vgg11"], num_classes, **kwargs)


@register_model
def vgg13(num_classes: int = 100, **kwargs) -> VGG:
    """CIFAR VGG13 with BatchNorm (the zoo's ``vgg13_bn``)."""
    return VGG(_CONFIGS["vgg13"], num_classes, **kwargs)


@register_model
def vgg16(num_classes: int = 100, **kwargs) -> VGG:
    """CIFAR VGG16 with BatchNorm (the zoo's ``vgg16_bn``)."""
    return VGG(_CONFIGS["vgg16"], num_classes, **kwargs)


@register_model
def vgg19(num_classes: int = 100, **kwargs) -> VGG:
    """CIFAR VGG19 with BatchNorm (the zoo's ``vgg19_bn``)."""
    return VGG(_CONFIGS["vgg19"], num_classes, **kwargs)
