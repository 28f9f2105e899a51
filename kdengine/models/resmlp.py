"""ResMLP in timm's layout: ``resmlp_12_224`` (ResMLP-S12).

Same architecture, parameter names and shapes as timm's ``resmlp_12_224`` (an ``MlpMixer`` with
ResMLP blocks and Affine norms), so timm's checkpoints load with ``strict=True`` and the official
DeiT-repository files load after ``remap_official_keys``; 15,350,872 parameters at 1000 classes.

Architecture: 16x16 patch conv ``stem.proj`` -> 12 blocks, each
x + ls1 * linear_tokens(norm1(x)^T)^T (one Linear L -> L across the tokens) and
x + ls2 * mlp_channels(norm2(x)) (hidden 4 x width = 1536), where the "norms" are per-channel
affine maps (``alpha`` * x + ``beta``, no statistics) and ``ls1``/``ls2`` are per-channel layer
scales initialised to 1e-4 -> Affine ``norm`` -> mean over tokens -> ``head``. The token Linear
is sized by the number of patches, so the model is built for one ``img_size``. Stochastic depth
is the same in every block (as timm's). Initialisation as timm's Mixer (``mlp_mixer``).

Features: the outputs of blocks 1, 3, 9 and 11 (0-based), before the final affine, as tokens
[B, L, C] (at 224 px 196x384): what OFA-KD and PAT tap. ``feature_format = "tokens"``;
``head`` takes ``pre_logits(features[-1])`` = the token mean of ``norm(features[-1])``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import register_model
from .layers import DropPath, Mlp
from .mlp_mixer import MlpMixer


class Affine(nn.Module):
    """ResMLP's normalisation: ``alpha * x + beta`` per channel (shapes [1, 1, C], timm's)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


class ResBlock(nn.Module):
    """ResMLP block: a linear token mix and a channel MLP, each scaled per channel.

    Args:
        dim: token width.
        num_tokens: tokens per image.
        mlp_ratio: hidden width of the channel MLP / ``dim``.
        init_scale: initial value of the layer scales ``ls1``/``ls2``.
        drop_path: stochastic depth of both branches.
    """

    def __init__(self, dim: int, num_tokens: int, mlp_ratio: float = 4.0, init_scale: float = 1e-4,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = Affine(dim)
        self.linear_tokens = nn.Linear(num_tokens, num_tokens)
        self.norm2 = Affine(dim)
        self.mlp_channels = Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = nn.Parameter(torch.full((dim,), init_scale))
        self.ls2 = nn.Parameter(torch.full((dim,), init_scale))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1 * self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.ls2 * self.mlp_channels(self.norm2(x)))


def remap_official_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ResMLP state dict of the official release (facebookresearch/deit ``resmlp_models``:
    ``patch_embed``, ``attn``, ``mlp``, ``gamma_1``/``gamma_2``, Affine vectors of shape [C]) to
    timm's layout. A state dict already in timm's layout (it has ``stem.proj.weight``) is returned
    unchanged.

    Args:
        state_dict: parameter name -> tensor (unwrapped from any ``{"model": ...}`` container).

    Returns:
        A new dict in timm's layout.
    """
    if "stem.proj.weight" in state_dict:
        return dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        k = k.replace("patch_embed.", "stem.").replace("attn.", "linear_tokens.").replace("mlp.", "mlp_channels.")
        k = k.replace("gamma_", "ls")
        if k.endswith((".alpha", ".beta")):
            v = v.reshape(1, 1, -1)
        out[k] = v
    return out


class ResMLP(MlpMixer):
    """An ``MlpMixer`` of ResMLP blocks; it also reads the official release's key names."""

    def remap_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return remap_official_keys(state)


@register_model
def resmlp_12_224(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.0, **kwargs) -> ResMLP:
    """ResMLP-S12: width 384, 12 blocks, channel MLP 1536, layer scale 1e-4 (timm ``resmlp_12_224``)."""

    def block(dim: int, num_tokens: int, drop_path: float) -> ResBlock:
        return ResBlock(dim, num_tokens, 4.0, 1e-4, drop_path)

    return ResMLP(384, 12, block, Affine, num_classes, img_size, drop_path_rate=drop_path_rate, **kwargs)
