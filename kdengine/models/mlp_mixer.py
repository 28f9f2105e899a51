"""MLP-Mixer in timm's layout: ``mixer_b16_224`` (Mixer-B/16), and the token-MLP model class that
ResMLP (``resmlp.py``) reuses with its own block and norm.

Same architecture, parameter names and shapes as timm's ``MlpMixer``, so timm's checkpoints (e.g.
``jx_mixer_b16_224-76587d61.pth``) load with ``strict=True``; 59,880,472 parameters at 1000
classes. Note the Mixer checkpoints from Google were trained on inputs normalised with mean =
std = 0.5, not the ImageNet statistics.

Architecture: 16x16 patch conv ``stem.proj`` -> 12 blocks, each x + token_mlp(norm1(x)^T)^T
(an MLP across the L tokens, hidden 0.5 x width = 384) and x + channel_mlp(norm2(x)) (hidden
4 x width = 3072), LayerNorm eps 1e-6 -> ``norm`` -> mean over tokens -> ``head``. The token MLP
is sized by the number of patches, so the model is built for one ``img_size``. Stochastic depth
uses the same rate in every block (timm's Mixer does not ramp it). Initialisation as timm's:
Xavier-uniform Linear weights, biases N(0, 1e-6) inside the MLPs and zero elsewhere, LeCun-normal
patch conv, zero classifier.

Features: the outputs of blocks 1, 3, 9 and 11 (0-based), before the final norm, as tokens
[B, L, C] (no class token; at 224 px 196x768): what OFA-KD and PAT tap. ``feature_format =
"tokens"``, so ADM's map contract does not apply; ``head`` takes ``pre_logits(features[-1])`` =
the mean over tokens of ``norm(features[-1])``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .base import ModelOutput, register_model
from .layers import DropPath, Mlp, PatchEmbed, TimmLayoutModel, lecun_normal_

FEATURE_BLOCKS = (1, 3, 9, 11)  # 0-based indices into ``blocks`` whose outputs are the features


class MixerBlock(nn.Module):
    """Token mixing (an MLP over the tokens of each channel), then channel mixing.

    Args:
        dim: token width.
        num_tokens: tokens per image.
        tokens_hidden: hidden width of the token MLP.
        channels_hidden: hidden width of the channel MLP.
        drop_path: stochastic depth of both branches.
    """

    def __init__(self, dim: int, num_tokens: int, tokens_hidden: int, channels_hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(num_tokens, tokens_hidden)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


def init_mixer_weights(model: nn.Module) -> None:
    """timm's Mixer/ResMLP initialisation (see the module docstring); modules it does not name keep
    their own initialisation (e.g. ResMLP's Affine and layer scales)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if name == "head":
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
                continue
            nn.init.xavier_uniform_(m.weight)
            if "mlp" in name:
                nn.init.normal_(m.bias, std=1e-6)
            else:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            lecun_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MlpMixer(TimmLayoutModel):
    """Patch stem, a stack of token-mixing blocks, a final norm, token mean, linear head.

    Differs from the CNN contract of ``KDModel``: ``features`` are token sequences [B, L, C]
    (blocks 1, 3, 9, 11), not pre-ReLU maps, and ``head`` takes the token mean of the final
    norm (``pre_logits``).

    Args:
        embed_dim: token width.
        depth: number of blocks.
        make_block: ``(dim, num_tokens, drop_path) -> block`` for one block.
        make_norm: ``(dim) -> module`` for the final norm.
        num_classes: width of the logits.
        img_size: side of the square input the model is built for.
        patch_size: side of a patch.
        drop_path_rate: stochastic depth of every block (constant, as timm's Mixer/ResMLP).
    """

    def __init__(self, embed_dim: int, depth: int, make_block: Callable[[int, int, float], nn.Module],
                 make_norm: Callable[[int], nn.Module], num_classes: int = 1000, img_size: int = 224,
                 patch_size: int = 16, drop_path_rate: float = 0.0):
        super().__init__()
        if max(FEATURE_BLOCKS) >= depth:
            raise ValueError(f"depth {depth} has no block {max(FEATURE_BLOCKS)} to tap")
        self.num_classes = num_classes
        self.img_size = img_size
        self.stem = PatchEmbed(img_size, patch_size, embed_dim)
        num_tokens = self.stem.grid ** 2
        self.blocks = nn.Sequential(*[make_block(embed_dim, num_tokens, drop_path_rate) for _ in range(depth)])
        self.norm = make_norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.stage_channels = (embed_dim,) * len(FEATURE_BLOCKS)
        self.stage_shapes = ((num_tokens, embed_dim),) * len(FEATURE_BLOCKS)
        init_mixer_weights(self)

    def pre_logits(self, last: torch.Tensor) -> torch.Tensor:
        return self.norm(last).mean(dim=1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        x = self.stem(x).flatten(1, 2)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in FEATURE_BLOCKS:
                feats.append(x)
        return ModelOutput(self.head(self.pre_logits(x)), feats, hints=feats)


@register_model
def mixer_b16_224(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.0, **kwargs) -> MlpMixer:
    """Mixer-B/16: width 768, 12 blocks, token MLP 384, channel MLP 3072 (timm ``mixer_b16_224``)."""

    def block(dim: int, num_tokens: int, drop_path: float) -> MixerBlock:
        return MixerBlock(dim, num_tokens, dim // 2, 4 * dim, drop_path)

    return MlpMixer(768, 12, block, lambda dim: nn.LayerNorm(dim, eps=1e-6), num_classes, img_size,
                    drop_path_rate=drop_path_rate, **kwargs)
