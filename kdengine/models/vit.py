"""Vision Transformers in timm's layout: ``deit_tiny_patch16_224`` and ``vit_small_patch16_224``.

Same architecture, parameter names and shapes as timm's ``VisionTransformer`` for these two
names (DeiT-Tiny is a plain ViT with width 192 and 3 heads; the distilled DeiT with a second
token is a different model), so timm checkpoints and the official DeiT files load with
``strict=True``. Counts at 1000 classes: DeiT-Tiny/16 5,717,416; ViT-Small/16 22,050,664.

Architecture: 16x16 patch conv -> class token prepended at index 0 -> learned position
embedding (1 + (img_size/16)^2 positions, so the model is built for one ``img_size``) -> 12
pre-norm blocks (LayerNorm eps 1e-6, MHSA with qkv bias, MLP 4x with GELU, each branch through
stochastic depth) -> final LayerNorm ``norm`` -> class token -> ``head``.
Initialisation as timm's default: Linear weights N(0, 0.02) (cut at +-2), zero biases, position
embedding N(0, 0.02), class token N(0, 1e-6).

Features: the outputs of blocks 1, 3, 9 and 11 (0-based), before the final norm, as tokens
[B, 1 + L, C] with the class token at index 0 (``num_prefix_tokens = 1``): what OFA-KD and PAT tap.
``feature_format = "tokens"``: unlike the CNNs' [B, C, H, W] pre-ReLU maps, these are
not maps, so ADM (defined on CNN maps) does not apply; ``head`` takes the normalised class token
(``pre_logits(features[-1])``), not an average pool.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import ModelOutput, register_model
from .layers import Attention, DropPath, Mlp, PatchEmbed, TimmLayoutModel, drop_path_rates, trunc_normal_init

FEATURE_BLOCKS = (1, 3, 9, 11)  # 0-based indices into ``blocks`` whose outputs are the features


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), both branches
    through stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(TimmLayoutModel):
    """ViT with a class token, classified from the class token (timm's ``global_pool='token'``).

    Differs from the CNN contract of ``KDModel``: ``features`` are token sequences [B, 1 + L, C]
    (blocks 1, 3, 9, 11; class token first), not pre-ReLU maps, and ``head`` takes the
    final-normalised class token (``pre_logits``), not an average pool.

    Args:
        embed_dim: token width.
        depth: number of blocks (``FEATURE_BLOCKS`` must exist in it).
        num_heads: attention heads.
        num_classes: width of the logits.
        img_size: side of the square input the model is built for.
        patch_size: side of a patch.
        mlp_ratio: hidden width of the MLPs / ``embed_dim``.
        drop_path_rate: stochastic depth of the last block; linear from 0 over the blocks.
    """

    num_prefix_tokens = 1

    def __init__(self, embed_dim: int, depth: int, num_heads: int, num_classes: int = 1000, img_size: int = 224,
                 patch_size: int = 16, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        super().__init__()
        if max(FEATURE_BLOCKS) >= depth:
            raise ValueError(f"depth {depth} has no block {max(FEATURE_BLOCKS)} to tap")
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        num_tokens = 1 + self.patch_embed.grid ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, p)
                                      for p in drop_path_rates(drop_path_rate, depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.stage_channels = (embed_dim,) * len(FEATURE_BLOCKS)
        self.stage_shapes = ((num_tokens, embed_dim),) * len(FEATURE_BLOCKS)
        self.apply(trunc_normal_init)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def pre_logits(self, last: torch.Tensor) -> torch.Tensor:
        # the final norm is per token, so normalising only the class token gives the same vector
        return self.norm(last[:, 0])

    def forward(self, x: torch.Tensor) -> ModelOutput:
        x = self.patch_embed(x).flatten(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in FEATURE_BLOCKS:
                feats.append(x)
        return ModelOutput(self.head(self.pre_logits(x)), feats, hints=feats)


@register_model
def deit_tiny_patch16_224(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.0,
                          **kwargs) -> VisionTransformer:
    """DeiT-Tiny/16 (timm ``deit_tiny_patch16_224``): width 192, 12 blocks, 3 heads."""
    return VisionTransformer(192, 12, 3, num_classes, img_size, drop_path_rate=drop_path_rate, **kwargs)


@register_model
def vit_small_patch16_224(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.0,
                          **kwargs) -> VisionTransformer:
    """ViT-Small/16 (timm ``vit_small_patch16_224``): width 384, 12 blocks, 6 heads."""
    return VisionTransformer(384, 12, 6, num_classes, img_size, drop_path_rate=drop_path_rate, **kwargs)
