"""Stage-by-stage forwards of the zoo's teacher families with a hook at each stage input: where
PAT inserts its prompt blocks into a frozen teacher, without editing the model classes.

:func:`staged_forward` runs a model's own submodules in the order of its ``forward`` and calls
``hook(i, h)`` on the input ``h`` of stage ``i`` (0-based), continuing from what the hook
returns; with the identity hook it returns exactly ``model(x)``. The stage inputs (PAT's prompt
sites, one before each of the four stage features the model reports):

==================  ==========================================================================
family              stage inputs (at 224 px)
==================  ==========================================================================
ResNet              before ``layer1``..``layer4``: the post-max-pool stem (64x56^2 for
                    ResNet-50), then each layer's output after its ReLU (256x56^2, 512x28^2,
                    1024x14^2)
ConvNeXt            before ``stages[0..3]``: the stem output, then each stage's output (before
                    the next stage's LayerNorm + 2x2 downsample)
ViT / DeiT          before blocks 0, 2, 4, 10 (features are blocks 1, 3, 9, 11): tokens with the
                    class token at index 0
Swin                after the patch embedding, and after each stage's patch merging (before the
                    stage's first block)
MLP-Mixer / ResMLP  before blocks 0, 2, 4, 10
==================  ==========================================================================

The hook sees maps [B, C, H, W] for ResNet and ConvNeXt and token sequences [B, L, C] for the
others (Swin's [B, H, W, C] grid flattened row-major, and reshaped back after the hook).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import mlp_mixer, vit
from .base import ModelOutput
from .convnext import ConvNeXt
from .imagenet_resnet import ResNet
from .mlp_mixer import MlpMixer
from .swin import SwinTransformer
from .utils import global_pool, run_stage
from .vit import VisionTransformer

#: ``hook(stage, h) -> h``: called on the input of each stage (0-based).
StageHook = Callable[[int, torch.Tensor], torch.Tensor]

NUM_SITES = 4  # one prompt site before each of the four stage features


def _identity(stage: int, h: torch.Tensor) -> torch.Tensor:
    return h


def _sites(feature_blocks: tuple[int, ...]) -> tuple[int, ...]:
    """Block indices with a stage input before them: block 0, and the block after each feature
    block but the last."""
    return (0,) + tuple(b + 1 for b in feature_blocks[:-1])


def _resnet(model: ResNet, x: torch.Tensor, hook: StageHook) -> ModelOutput:
    stem = model.bn1(model.conv1(x))
    x = F.relu(stem)
    if not model.cifar_stem:
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    feats = [stem]
    for i, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        pre, x = run_stage(layer, hook(i, x))
        feats.append(pre)
    return ModelOutput(model.fc(global_pool(x)), feats)


def _convnext(model: ConvNeXt, x: torch.Tensor, hook: StageHook) -> ModelOutput:
    x = model.stem(x)
    feats = []
    for i, stage in enumerate(model.stages):
        x = stage(hook(i, x))
        feats.append(x)
    return ModelOutput(model.head(model.pre_logits(x)), feats, hints=feats)


def _token_blocks(model: nn.Module, x: torch.Tensor, hook: StageHook, feature_blocks: tuple[int, ...]):
    sites = _sites(feature_blocks)
    feats = []
    for i, block in enumerate(model.blocks):
        if i in sites:
            x = hook(sites.index(i), x)
        x = block(x)
        if i in feature_blocks:
            feats.append(x)
    return x, feats


def _vit(model: VisionTransformer, x: torch.Tensor, hook: StageHook) -> ModelOutput:
    x = model.patch_embed(x).flatten(1, 2)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    x, feats = _token_blocks(model, x, hook, vit.FEATURE_BLOCKS)
    return ModelOutput(model.head(model.pre_logits(x)), feats, hints=feats)


def _mixer(model: MlpMixer, x: torch.Tensor, hook: StageHook) -> ModelOutput:
    x = model.stem(x).flatten(1, 2)
    x, feats = _token_blocks(model, x, hook, mlp_mixer.FEATURE_BLOCKS)
    return ModelOutput(model.head(model.pre_logits(x)), feats, hints=feats)


def _swin(model: SwinTransformer, x: torch.Tensor, hook: StageHook) -> ModelOutput:
    x = model.patch_embed(x)
    feats = []
    for i, stage in enumerate(model.layers):
        x = stage.downsample(x)
        x = hook(i, x.flatten(1, 2)).reshape(x.shape)
        x = stage.blocks(x)
        feats.append(x.flatten(1, 2))
    return ModelOutput(model.head(model.pre_logits(feats[-1])), feats, hints=feats)


# isinstance order matters only for subclasses (ResMLP is an MlpMixer)
_FAMILIES: tuple[tuple[type, Callable[..., ModelOutput]], ...] = (
    (ResNet, _resnet), (ConvNeXt, _convnext), (VisionTransformer, _vit), (SwinTransformer, _swin),
    (MlpMixer, _mixer),
)


def supports_prompts(model: nn.Module) -> bool:
    """Whether :func:`staged_forward` knows the model's family."""
    return isinstance(model, tuple(cls for cls, _ in _FAMILIES))


def staged_forward(model: nn.Module, x: torch.Tensor, hook: Optional[StageHook] = None) -> ModelOutput:
    """``model(x)``, run stage by stage with ``hook`` applied to each stage input.

    Args:
        model: a zoo model of a supported family (ImageNet/CIFAR-stem ResNets, ConvNeXt, ViT/DeiT,
            Swin, MLP-Mixer, ResMLP).
        x: the images.
        hook: ``hook(stage, h) -> h`` on each of the ``NUM_SITES`` stage inputs (see the module
            docstring for where they are and their layout); None: the identity.

    Returns:
        The model's ``ModelOutput``; with the identity hook it equals ``model(x)`` exactly.

    Raises:
        TypeError: the model's family has no staged forward.
    """
    for cls, fn in _FAMILIES:
        if isinstance(model, cls):
            return fn(model, x, hook or _identity)
    names = ", ".join(cls.__name__ for cls, _ in _FAMILIES)
    raise TypeError(f"{type(model).__name__} has no staged forward for prompts; supported families: {names}")
