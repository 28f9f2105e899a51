"""Swin Transformers in timm's current layout: ``swin_tiny_patch4_window7_224`` (Swin-T) and
OFA-KD's small variants ``swin_pico_patch4_window7_224`` (Swin-P, width 48) and
``swin_nano_patch4_window7_224`` (Swin-N, width 64).

Same architecture, parameter names and shapes as timm's ``SwinTransformer`` (timm >= 0.9), so
its checkpoints load with ``strict=True``; files written in the older layout (the official
Microsoft release and timm <= 0.8, e.g. OFA-KD's CIFAR teachers) load after
``remap_legacy_keys``. Swin-T has 28,288,354 parameters at 1000 classes.

Architecture: 4x4 patch conv + LayerNorm -> 4 stages; stage i > 0 starts with a 2x2 patch
merging (LayerNorm over 4C, Linear 4C -> 2C without bias); each stage holds pre-norm blocks
with window attention (relative position bias per head) that alternate plain and shifted
(by window/2) windows, and a 4x MLP -> LayerNorm ``norm`` -> token mean -> ``head.fc``.
Widths C, 2C, 4C, 8C. LayerNorm eps 1e-5 (PyTorch's default, as timm's Swin).

Small inputs follow timm: where a stage's feature map is not larger than the window, the window
shrinks to the map and the shift is dropped (so ``img_size=32`` gives windows 7, 4, 2, 1 and
the relative-position tables of stages 1-3 are smaller than at 224: weights are tied to
``img_size``); where the map is larger but not a multiple of the window, the shifted map is
padded at the bottom/right and attention runs on the padded windows (the shift mask covers the
padded size), as timm does. Stochastic depth grows linearly over all blocks; timm's default
rate for these models is 0.1, and so is ours.

Features: the output of the last block of each stage (before the next stage's patch merging
and before the final norm), as tokens [B, H_i * W_i, C_i] in row-major order
(``feature_format = "tokens"``; ``.view(B, H_i, W_i, C_i)`` restores timm's NHWC map): at 224
px 3136x96, 784x192, 196x384, 49x768 for Swin-T, the stage features PAT and OFA-KD use. ADM's
map contract does not apply; ``head`` takes ``pre_logits(features[-1])`` = the mean over tokens
of ``norm(features[-1])``.

``relative_position_index`` and ``attn_mask`` are non-persistent buffers (not in the state
dict, as in current timm). They are computed at construction, so a model built on the ``meta``
device has to be rebuilt, not ``to_empty``-ed, before use.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ModelOutput, register_model
from .layers import DropPath, Mlp, PatchEmbed, PooledHead, TimmLayoutModel, drop_path_rates, trunc_normal_init

# the additive attention mask between tokens that the cyclic shift brought together (timm's value)
_MASKED = -100.0


def _ceil_half(n: int) -> int:
    return (n + 1) // 2


def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w] index into the (2w-1)^2-row bias table for each (query, key) pair of a window:
    the row-major index of the key's offset from the query, both offsets shifted to >= 0."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shifted_window_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """[num_windows, w*w, w*w] additive mask for shifted-window attention on a map of side
    ``resolution`` (padded up to a multiple of ``window``): 0 between tokens of the same region
    of the rolled map, ``_MASKED`` between tokens that the roll made neighbours."""
    padded = -(-resolution // window) * window
    coord = torch.arange(padded)
    # three bands per axis after the roll: the untouched part, the last window before the
    # wrapped strip, and the wrapped strip of width ``shift``
    band = (coord >= padded - window).long() + (coord >= padded - shift).long()
    region = band[:, None] * 3 + band[None, :]  # [padded, padded]
    n = padded // window
    region = region.view(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)
    same = region[:, :, None] == region[:, None, :]
    return torch.where(same, 0.0, _MASKED)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of ``window``) -> [B * num_windows, window^2, C], windows in
    row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: [B * num_windows, window^2, C] -> [B, h, w, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned bias per head for every
    relative offset (``relative_position_bias_table``, (2w-1)^2 x heads).

    Args:
        dim: token width.
        num_heads: attention heads.
        window: window side.
    """

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B * num_windows, N, C]; mask: [num_windows, N, N] or None."""
        bw, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, h)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.permute(2, 0, 1)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, h, n, n) + mask[None, :, None]).view(bw, h, n, n)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on a [B, H, W, C] map: (shifted) window attention, then the MLP.

    Args:
        dim: width.
        num_heads: attention heads.
        resolution: side of the (square) map the block sees.
        window: requested window side (clamped to ``resolution``).
        shift: requested cyclic shift (0 for plain windows; dropped when the window is clamped).
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path: stochastic depth of both branches.
    """

    def __init__(self, dim: int, num_heads: int, resolution: int, window: int, shift: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0):
        super().__init__()
        if resolution <= window:  # one window covers the map: nothing to shift
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        mask = shifted_window_mask(resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        ws, s = self.window, self.shift
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, (-w) % ws, 0, (-h) % ws))  # bottom/right, after the roll (as timm)
        hp, wp = x.shape[1], x.shape[2]
        x = self.attn(window_partition(x, ws), self.attn_mask)
        x = window_merge(x, ws, hp, wp)[:, :h, :w]
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concatenate the four (order: (0,0), (1,0), (0,1), (1,1)
    as (row, col) offsets, the order of the official weights), LayerNorm, Linear 4C -> 2C.
    Odd sides are zero-padded at the bottom/right."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = x.view(b, _ceil_half(h), 2, _ceil_half(w), 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging (``downsample``), then ``depth`` blocks alternating plain and
    shifted windows."""

    def __init__(self, in_dim: int, depth: int, num_heads: int, resolution: int, window: int, downsample: bool,
                 drop_paths: list[float], mlp_ratio: float = 4.0):
        super().__init__()
        self.downsample = PatchMerging(in_dim) if downsample else nn.Identity()
        dim = 2 * in_dim if downsample else in_dim
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, resolution, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_paths[i])
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SwinTransformer(TimmLayoutModel):
    """Swin Transformer (v1), timm's layout.

    Differs from the CNN contract of ``KDModel``: ``features`` are token sequences
    [B, H_i * W_i, C_i] (last block of each stage, row-major), not pre-ReLU maps, and ``head``
    takes the token mean of the final norm (``pre_logits``).

    Args:
        embed_dim: width of stage 1 (doubles at each stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        num_classes: width of the logits.
        img_size: side of the square input the model is built for (a multiple of ``patch_size``).
        patch_size: patch side of the embedding.
        window: window side.
        mlp_ratio: MLP hidden width / stage width.
        drop_path_rate: stochastic depth of the last block; linear from 0 over all blocks.
    """

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], num_classes: int = 1000,
                 img_size: int = 224, patch_size: int = 4, window: int = 7, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim, norm=True)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        stages, shapes, dims = [], [], []
        resolution, dim, start = self.patch_embed.grid, embed_dim, 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            if i > 0:
                resolution, dim = _ceil_half(resolution), 2 * dim
            stages.append(SwinStage(dim // 2 if i > 0 else dim, depth, heads, resolution, window, i > 0,
                                    rates[start:start + depth], mlp_ratio))
            start += depth
            shapes.append((resolution * resolution, dim))
            dims.append(dim)
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.head = PooledHead(dim, num_classes)
        self.stage_channels = tuple(dims)
        self.stage_shapes = tuple(shapes)
        self.apply(trunc_normal_init)

    def pre_logits(self, last: torch.Tensor) -> torch.Tensor:
        return self.norm(last).mean(dim=1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        x = self.patch_embed(x)
        feats = []
        for stage in self.layers:
            x = stage(x)
            feats.append(x.flatten(1, 2))
        return ModelOutput(self.head(self.pre_logits(feats[-1])), feats, hints=feats)

    def remap_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return remap_legacy_keys(state)


def remap_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Swin state dict of the older layout (Microsoft's release, timm <= 0.8) to ours.

    The older layout put the patch merging at the *end* of stages 0-2 (``layers.i.downsample``
    -> ``layers.{i+1}.downsample``), named the classifier ``head`` (-> ``head.fc``) and saved the
    ``relative_position_index`` / ``attn_mask`` buffers (dropped: they are recomputed). A state
    dict already in the current layout (it has ``head.fc.weight``) is returned unchanged.

    Args:
        state_dict: parameter name -> tensor (unwrapped from any ``{"model": ...}`` container).

    Returns:
        A new dict in the current layout.
    """
    if "head.fc.weight" in state_dict:
        return dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        k = re.sub(r"^head\.", "head.fc.", k)
        out[k] = v
    return out


@register_model
def swin_tiny_patch4_window7_224(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1,
                                 **kwargs) -> SwinTransformer:
    """Swin-T: width 96, depths 2-2-6-2, heads 3-6-12-24 (timm ``swin_tiny_patch4_window7_224``)."""
    return SwinTransformer(96, (2, 2, 6, 2), (3, 6, 12, 24), num_classes, img_size, drop_path_rate=drop_path_rate,
                           **kwargs)


@register_model
def swin_pico_patch4_window7_224(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1,
                                 **kwargs) -> SwinTransformer:
    """Swin-P (OFA-KD's student): width 48, depths 2-2-2-2, heads 2-4-8-16."""
    return SwinTransformer(48, (2, 2, 2, 2), (2, 4, 8, 16), num_classes, img_size, drop_path_rate=drop_path_rate,
                           **kwargs)


@register_model
def swin_nano_patch4_window7_224(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.1,
                                 **kwargs) -> SwinTransformer:
    """Swin-N (OFA-KD's student): width 64, depths 2-2-2-2, heads 2-4-8-16."""
    return SwinTransformer(64, (2, 2, 2, 2), (2, 4, 8, 16), num_classes, img_size, drop_path_rate=drop_path_rate,
                           **kwargs)
