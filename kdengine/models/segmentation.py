"""Semantic segmentation: DeepLabV3 and PSPNet on dilated ResNets at output stride 8.

The layout of the public Cityscapes KD code (CIRKD, whose ``resnetv1b.py`` / ``deeplabv3.py`` /
``pspnet.py`` it follows):

- **Backbone** (:class:`DilatedResNet`): torchvision's ResNet blocks (``resnet_blocks``) with
  layer3 at dilation 2 and layer4 at dilation 4 instead of stride 2, so the maps stay at H/8.
  In a dilated stage the first block's entry 3x3 conv (where the stride was) keeps the previous
  dilation (1 in layer3, 2 in layer4) and every other 3x3 conv takes the stage's; the shortcut
  convs become stride 1. Two stems: ``deep_stem=True`` is the "v1s" stem (3x3 convs 3->64
  stride 2, 64->64, 64->128, each with BN and ReLU, then the 3x3 max-pool; layer1 then starts
  from 128 channels, so its first block projects), ``deep_stem=False`` torchvision's 7x7 conv.
- **Heads** on relu(layer4):
  DeepLabV3: ASPP of a 1x1 branch, 3x3 branches at rates 12/24/36 and image pooling, 512 channels
  each (R18 and R101 alike), projected 5*512 -> 512 (1x1 + BN + ReLU + dropout 0.5); then a 3x3
  conv 512 -> 512 + BN + ReLU + dropout 0.1 gives the **head feature**; a 1x1 conv classifies it.
  PSPNet: pyramid pooling at bins 1/2/3/6 (1x1 conv to C/4 + BN + ReLU per bin, bilinear back,
  concatenated with the input: 2C channels); a 3x3 conv to 128 (R18) / 256 (R101) + BN + ReLU +
  dropout 0.1 gives the head feature; a 1x1 conv classifies it.
- **Auxiliary FCN head** on relu(layer3): 3x3 conv to C/4 + BN + ReLU + dropout 0.1, 1x1 conv to
  the classes. Its loss weight (0.4) is the training recipe's, not the model's.

``forward`` returns a :class:`SegOutput` at the feature grid (H/8, W/8): the loss and the
evaluation upsample the logits to the label size; ADM's dense form works on the head feature at
this grid (labels nearest-downsampled to it). ``features`` are the backbone's stage outputs before
their ReLU, as the classification zoo reports them (entry 0 the stem, which L_feat skips).

The models are :class:`~kdengine.models.base.KDModel` s with ``stage_channels`` (the backbone's
stages), ``head_channels`` (the head feature's) and ``head`` (the classifier, which also maps
pooled ``[..., C]`` vectors, e.g. ADM's region pools, to ``[..., K]``); their ``forward``
returns a :class:`SegOutput` rather than a ``ModelOutput``.

ImageNet weights for the backbone: :meth:`SegModel.load_backbone` (or the constructors'
``backbone_weights``) reads a classification checkpoint in torchvision's names (``conv1``,
``bn1``, ``layer1.0.conv1`` ...; the deep stem adds ``conv2``/``bn2``/``conv3``/``bn3``, the
names of CIRKD's ``resnet18-imagenet.pth`` / ``resnet101-imagenet.pth``), strictly, dropping
the classifier ``fc``. A torchvision ``resnet18``/``resnet101`` file fits ``deep_stem=False``.

Pooling branches use BatchNorm on 1x1 / 2x2 maps, so training needs more than one image per
(synchronised) batch-norm group, as in the reference code.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel, register_model
from .pretrained import load_pretrained
from .resnet_blocks import BasicBlock, Bottleneck, make_stage
from .utils import init_weights, run_stage

#: Dilation of layer3 and layer4 (output stride 8).
STAGE_DILATIONS = (2, 4)
ASPP_RATES = (12, 24, 36)
PSP_BINS = (1, 2, 3, 6)


class SegOutput(NamedTuple):
    """What a segmentation model's ``forward`` returns; spatial sizes are the feature grid
    ``h, w = ceil(H / 8), ceil(W / 8)`` of an ``[B, 3, H, W]`` input.

    ``logits``: ``[B, K, h, w]``. ``aux_logits``: ``[B, K, h, w]`` of the auxiliary FCN head on
    layer3 (None when built with ``aux=False``). ``head_feature``: ``[B, C_head, h, w]``, the
    classifier's input (after the head's ReLU and dropout), the map ADM's dense form uses.
    ``features``: the backbone's stage outputs before their ReLU (stem at H/2, layer1 at H/4,
    layer2-4 at H/8), what L_feat matches.
    """

    logits: torch.Tensor
    aux_logits: Optional[torch.Tensor]
    head_feature: torch.Tensor
    features: list[torch.Tensor]


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU, padded to keep the size."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def dilate_stage(stage: nn.Sequential, dilation: int) -> None:
    """Turn a stride-2 stage of ``make_stage`` into a dilated stride-1 one, in place.

    The first block's entry 3x3 conv (BasicBlock ``conv1``, Bottleneck ``conv2``: where the
    stride was) gets ``dilation // 2``, the previous stage's dilation; every other 3x3 conv gets
    ``dilation``. The weights keep their shapes, so ImageNet checkpoints still load.
    """
    for i, block in enumerate(stage):
        entry = block.conv1 if isinstance(block, BasicBlock) else block.conv2
        convs = (block.conv1, block.conv2) if isinstance(block, BasicBlock) else (block.conv2,)
        for conv in convs:
            d = dilation // 2 if (i == 0 and conv is entry) else dilation
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class DilatedResNet(nn.Module):
    """ResNet backbone at output stride 8 (module docstring), no classifier.

    Args:
        block: ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50/101).
        depths: blocks in layer1-4.
        deep_stem: the 3x3x3 "v1s" stem instead of torchvision's 7x7 conv.
        width: the base width w (64: the ResNets; the stages have w, 2w, 4w, 8w planes and the deep
            stem w, w, 2w channels). Smaller widths make the CPU-sized models of the embedded
            segmentation task; ImageNet checkpoints fit only w = 64.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: Sequence[int], deep_stem: bool = True,
                 width: int = 64):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        e, w = block.expansion, width
        self.deep_stem = deep_stem
        stem = 2 * w if deep_stem else w
        if deep_stem:
            self.conv1 = nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
            self.conv2 = nn.Conv2d(w, w, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(w)
            self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(2 * w)
        else:
            self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = make_stage(block, stem, w, depths[0], stride=1)
        self.layer2 = make_stage(block, w * e, 2 * w, depths[1], stride=2)
        self.layer3 = make_stage(block, 2 * w * e, 4 * w, depths[2], stride=2)
        self.layer4 = make_stage(block, 4 * w * e, 8 * w, depths[3], stride=2)
        dilate_stage(self.layer3, STAGE_DILATIONS[0])
        dilate_stage(self.layer4, STAGE_DILATIONS[1])
        self.stage_channels = (stem, w * e, 2 * w * e, 4 * w * e, 8 * w * e)
        init_weights(self)

    def remap_state_dict(self, state: dict) -> dict:
        """An ImageNet classification state dict without its classifier (``fc``), which the
        backbone lacks; ``load_pretrained`` calls this before its strict, renaming load."""
        return {k: v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Returns ``(features, relu(layer3), relu(layer4))``: the five pre-ReLU stage outputs
        and what the auxiliary and the main head read."""
        if self.deep_stem:
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            stem = self.bn3(self.conv3(x))
        else:
            stem = self.bn1(self.conv1(x))
        x = F.max_pool2d(F.relu(stem), kernel_size=3, stride=2, padding=1)
        f1, x = run_stage(self.layer1, x)
        f2, x = run_stage(self.layer2, x)
        f3, x3 = run_stage(self.layer3, x)
        f4, x4 = run_stage(self.layer4, x3)
        return [stem, f1, f2, f3, f4], x3, x4


class PixelClassifier(nn.Conv2d):
    """The 1x1 conv classifier. Takes ``[B, C, h, w]`` maps, and also ``[..., C]`` vectors
    (pooled features, e.g. ADM's per-class region pools), which it maps to ``[..., K]`` with the
    same weights."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return super().forward(x)
        return F.linear(x, self.weight.flatten(1), self.bias)


class ASPP(nn.Module):
    """DeepLabV3's atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling
    branch, concatenated and projected (1x1 + BN + ReLU + dropout 0.5)."""

    def __init__(self, in_channels: int, channels: int = 512, rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, channels)] +
                                      [conv_bn_relu(in_channels, channels, 3, r) for r in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels))
        self.project = nn.Sequential(conv_bn_relu((len(rates) + 2) * channels, channels), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upsampling a 1x1 map (bilinear, as the reference) is a broadcast.
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3Decoder(nn.Module):
    """ASPP, then 3x3 conv + BN + ReLU + dropout 0.1: the head feature (``channels``)."""

    def __init__(self, in_channels: int, channels: int = 512):
        super().__init__()
        self.aspp = ASPP(in_channels, channels)
        self.block = nn.Sequential(conv_bn_relu(channels, channels, 3), nn.Dropout(0.1))
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.aspp(x))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: per bin size, average pooling, 1x1 conv to C/4 + BN + ReLU and
    bilinear upsampling (align_corners=True, as the reference); concatenated after the input."""

    def __init__(self, in_channels: int, bins: Sequence[int] = PSP_BINS):
        super().__init__()
        self.bins = tuple(bins)
        self.stages = nn.ModuleList([conv_bn_relu(in_channels, in_channels // 4) for _ in self.bins])
        self.out_channels = in_channels + len(self.bins) * (in_channels // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pyramid = [F.interpolate(stage(F.adaptive_avg_pool2d(x, b)), size, mode="bilinear", align_corners=True)
                   for b, stage in zip(self.bins, self.stages)]
        return torch.cat([x, *pyramid], dim=1)


class PSPDecoder(nn.Module):
    """Pyramid pooling, then 3x3 conv + BN + ReLU + dropout 0.1: the head feature (``channels``)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.ppm = PyramidPooling(in_channels)
        self.block = nn.Sequential(conv_bn_relu(self.ppm.out_channels, channels, 3), nn.Dropout(0.1))
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.ppm(x))


class FCNHead(nn.Sequential):
    """The auxiliary head: 3x3 conv to C/4 + BN + ReLU + dropout 0.1, 1x1 conv to the classes."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(conv_bn_relu(in_channels, in_channels // 4, 3), nn.Dropout(0.1),
                         nn.Conv2d(in_channels // 4, num_classes, 1))


class SegModel(KDModel):
    """Backbone + decoder + 1x1 classifier (+ auxiliary FCN head on layer3).

    Args:
        backbone: a :class:`DilatedResNet`.
        decoder: maps relu(layer4) to the head feature; has ``out_channels``.
        num_classes: K.
        aux: build the auxiliary head (``SegOutput.aux_logits``).
    """

    def __init__(self, backbone: DilatedResNet, decoder: nn.Module, num_classes: int, aux: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.decoder = decoder
        self.classifier = PixelClassifier(decoder.out_channels, num_classes)
        self.aux_head = FCNHead(backbone.stage_channels[3], num_classes) if aux else None
        self.stage_channels = backbone.stage_channels
        self.head_channels = decoder.out_channels
        init_weights(self.decoder)
        # The pixel classifiers as mmseg's decode heads: N(0, 0.01), zero bias. A Kaiming fan-out
        # init of a 1x1 conv to K outputs (std sqrt(2 / K)) starts the CE far above log K.
        classifiers = [self.classifier] + ([self.aux_head[-1]] if self.aux_head is not None else [])
        if self.aux_head is not None:
            init_weights(self.aux_head)
        for conv in classifiers:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def load_backbone(self, path: os.PathLike | str) -> None:
        """Load ImageNet classification weights into the backbone (module docstring), strictly.

        Args:
            path: a checkpoint ``load_pretrained`` reads (a state dict, ``{"state_dict": ...}``,
                ``{"model": ...}``), in torchvision's names plus the deep stem's.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the weights do not fit the backbone (the message names the keys).
        """
        load_pretrained(self.backbone, path, None, 0)

    def forward(self, x: torch.Tensor) -> SegOutput:
        features, x3, x4 = self.backbone(x)
        head_feature = self.decoder(x4)
        aux = self.aux_head(x3) if self.aux_head is not None else None
        return SegOutput(self.classifier(head_feature), aux, head_feature, features)


# block and blocks per stage (layer1-4) of each depth, as imagenet_resnet
_DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 101: (Bottleneck, (3, 4, 23, 3))}
# PSPNet's head feature channels per depth (the reference's 128 for 512-channel, 256 for
# 2048-channel backbones)
_PSP_CHANNELS = {18: 128, 101: 256}


def _build(kind: str, depth: int, num_classes: int, deep_stem: bool, aux: bool,
           backbone_weights: Optional[os.PathLike | str], width: int = 64,
           head_channels: Optional[int] = None) -> SegModel:
    backbone = DilatedResNet(*_DEPTHS[depth], deep_stem=deep_stem, width=width)
    top = backbone.stage_channels[-1]
    if head_channels is None:
        head_channels = 512 if kind == "deeplabv3" else _PSP_CHANNELS[depth]
    if isinstance(head_channels, bool) or not isinstance(head_channels, int) or head_channels < 1:
        raise ValueError(f"head_channels must be a positive int, got {head_channels!r}")
    decoder = DeepLabV3Decoder(top, head_channels) if kind == "deeplabv3" else PSPDecoder(top, head_channels)
    model = SegModel(backbone, decoder, num_classes, aux=aux)
    if backbone_weights is not None:
        model.load_backbone(backbone_weights)
    return model


@register_model
def deeplabv3_resnet18(num_classes: int = 19, deep_stem: bool = True, aux: bool = True,
                       backbone_weights: Optional[os.PathLike | str] = None, width: int = 64,
                       head_channels: Optional[int] = None) -> SegModel:
    """DeepLabV3 on a dilated ResNet-18 (head feature 512 channels).

    Args:
        num_classes: K (Cityscapes: 19).
        deep_stem: the 3x3x3 stem (CIRKD's ``resnet18_v1s``) rather than torchvision's.
        aux: the auxiliary FCN head on layer3.
        backbone_weights: an ImageNet classification checkpoint to load into the backbone.
        width: the backbone's base width (:class:`DilatedResNet`; 64 for the ResNet, smaller for
            the embedded segmentation task on a CPU).
        head_channels: the head feature's channels (default 512; the ASPP branches have as many).
    """
    return _build("deeplabv3", 18, num_classes, deep_stem, aux, backbone_weights, width, head_channels)


@register_model
def deeplabv3_resnet101(num_classes: int = 19, deep_stem: bool = True, aux: bool = True,
                        backbone_weights: Optional[os.PathLike | str] = None, width: int = 64,
                        head_channels: Optional[int] = None) -> SegModel:
    """DeepLabV3 on a dilated ResNet-101 (head feature 512 channels); arguments as
    :func:`deeplabv3_resnet18`."""
    return _build("deeplabv3", 101, num_classes, deep_stem, aux, backbone_weights, width, head_channels)


@register_model
def pspnet_resnet18(num_classes: int = 19, deep_stem: bool = True, aux: bool = True,
                    backbone_weights: Optional[os.PathLike | str] = None, width: int = 64,
                    head_channels: Optional[int] = None) -> SegModel:
    """PSPNet on a dilated ResNet-18 (head feature 128 channels); arguments as
    :func:`deeplabv3_resnet18`."""
    return _build("pspnet", 18, num_classes, deep_stem, aux, backbone_weights, width, head_channels)


@register_model
def pspnet_resnet101(num_classes: int = 19, deep_stem: bool = True, aux: bool = True,
                     backbone_weights: Optional[os.PathLike | str] = None, width: int = 64,
                     head_channels: Optional[int] = None) -> SegModel:
    """PSPNet on a dilated ResNet-101 (head feature 256 channels); arguments as
    :func:`deeplabv3_resnet18`."""
    return _build("pspnet", 101, num_classes, deep_stem, aux, backbone_weights, width, head_channels)


#: The registry names of the segmentation models (their ``forward`` returns a :class:`SegOutput`).
SEGMENTATION_MODELS = ("deeplabv3_resnet18", "deeplabv3_resnet101", "pspnet_resnet18", "pspnet_resnet101")
