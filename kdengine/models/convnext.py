"""ConvNeXt in timm's layout: ``convnext_tiny`` (ConvNeXt-T).

Same architecture, parameter names and shapes as timm's ``ConvNeXt`` (``convnext_tiny``), so
timm checkpoints load with ``strict=True``; the official facebookresearch files (e.g.
``convnext_tiny_1k_224_ema.pth``) use other names and load after ``remap_official_keys``.
28,589,128 parameters at 1000 classes.

Architecture: 4x4 stride-4 conv + channels-first LayerNorm (``stem``) -> 4 stages of depths
3-3-9-3, widths 96-192-384-768; stages 2-4 start with LayerNorm + 2x2 stride-2 conv
(``stages.i.downsample``); each block is x + gamma * fc2(GELU(fc1(LN(dwconv7x7(x))))) with the
LayerNorm and the MLP applied channels-last and ``gamma`` a per-channel layer scale initialised
to 1e-6 -> global average pool -> ``head.norm`` (LayerNorm) -> ``head.fc``. LayerNorm eps 1e-6.
Stochastic depth grows linearly over all 18 blocks. Initialisation as timm's: conv and Linear
weights N(0, 0.02) cut at +-2, zero biases. Any input size works (no position-dependent
weights); ``img_size`` only sets ``stage_shapes``.

Features: each stage's output [B, C_i, H/4/2^i, W/4/2^i] (``feature_format = "nchw"``): what
OFA-KD and PAT tap. These maps are not pre-ReLU (ConvNeXt has no ReLU) and ``head`` takes the
plain global average pool of ``features[-1]`` (its LayerNorm included), so ADM can pool them,
but ``relu(features[-1])`` is not what the network continues from.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ModelOutput, register_model
from .layers import DropPath, Mlp, PooledHead, TimmLayoutModel, drop_path_rates


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, then (channels-last) LayerNorm + 4x MLP, scaled by ``gamma``, residual.

    Args:
        dim: channels.
        drop_path: stochastic depth of the branch.
        layer_scale: initial value of ``gamma``.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))) * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtStage(nn.Module):
    """Optional LayerNorm + 2x2 stride-2 conv (``downsample``), then the blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: list[float], downsample: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, p) for p in drop_paths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(TimmLayoutModel):
    """ConvNeXt (v1), timm's layout.

    Differs from the CNN contract of ``KDModel``: ``features`` (the four stage outputs) are not
    followed by a ReLU, and ``head`` (LayerNorm + Linear) takes the plain average pool of
    ``features[-1]`` (``pre_logits``), not the pool of its ReLU.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        num_classes: width of the logits.
        img_size: input side used for ``stage_shapes`` (the network accepts any size).
        drop_path_rate: stochastic depth of the last block; linear from 0 over all blocks.
    """

    feature_format = "nchw"

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], num_classes: int = 1000, img_size: int = 224,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        rates = drop_path_rates(drop_path_rate, sum(depths))
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(ConvNeXtStage(dims[max(i - 1, 0)], dim, depth, rates[start:start + depth], i > 0))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.head = PooledHead(dims[-1], num_classes, norm=True)
        self.stage_channels = tuple(dims)
        side = img_size // 4
        self.stage_shapes = tuple((dim, side >> i, side >> i) for i, dim in enumerate(dims))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pre_logits(self, last: torch.Tensor) -> torch.Tensor:
        return last.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return ModelOutput(self.head(self.pre_logits(x)), feats, hints=feats)

    def remap_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return remap_official_keys(state)


def remap_official_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ConvNeXt state dict of the official release (facebookresearch/ConvNeXt:
    ``downsample_layers.i``, ``stages.i.j``, ``dwconv``, ``pwconv1/2``, final ``norm``, ``head``)
    to timm's layout. A state dict already in timm's layout (it has ``head.norm.weight``) is
    returned unchanged.

    Args:
        state_dict: parameter name -> tensor (unwrapped from any ``{"model": ...}`` container).

    Returns:
        A new dict in timm's layout.
    """
    if "head.norm.weight" in state_dict:
        return dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
        k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        k = re.sub(r"^norm\.", "head.norm.", k)
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v
    return out


@register_model
def convnext_tiny(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """ConvNeXt-T: depths 3-3-9-3, widths 96-192-384-768 (timm ``convnext_tiny``)."""
    return ConvNeXt((3, 3, 9, 3), (96, 192, 384, 768), num_classes, img_size, drop_path_rate, **kwargs)
