"""Hierarchical context loss (hcl): PAT's feature loss between aligned student features and the
teacher's stage features (ReviewKD's ``hcl_loss``, as PAT uses it).

Unlike ADM's ``ops.feature_mse`` the teacher side is **not** detached: in PAT the target is the
prompted teacher's feature, and the gradient of this loss through the frozen teacher is what
trains the prompt blocks. Pass a detached target where a fixed target is wanted.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

#: Pooled levels (output sides) after the full-resolution term, in order; each is used only when
#: it is smaller than the feature's height, and each weighs half the previous one.
HCL_LEVELS = (4, 2, 1)


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """Token sequence [B, L, C] -> map [B, C, h, h] with h = sqrt(L), tokens in row-major order
    (einops ``b (h w) c -> b c h w``).

    Args:
        x: tokens [B, L, C]; L must be a perfect square (strip any class token first).

    Returns:
        A [B, C, h, h] view-permuted tensor.

    Raises:
        ValueError: x is not 3-d or L is not a perfect square.
    """
    if x.dim() != 3:
        raise ValueError(f"tokens must be [B, L, C], got {tuple(x.shape)}")
    b, n, c = x.shape
    h = math.isqrt(n)
    if h * h != n:
        raise ValueError(f"{n} tokens do not form a square grid (strip the class token first)")
    return x.transpose(1, 2).reshape(b, c, h, h)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Map [B, C, h, w] -> tokens [B, h*w, C] in row-major order: the inverse of
    :func:`tokens_to_map`."""
    return x.flatten(2).transpose(1, 2)


def as_map(x: torch.Tensor) -> torch.Tensor:
    """A stage feature as a map: [B, C, H, W] unchanged, tokens [B, L, C] through
    :func:`tokens_to_map`."""
    return x if x.dim() == 4 else tokens_to_map(x)


def hcl(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """The hierarchical context loss of one stage.

    ``(mse(s, t) + sum_k w_k * mse(P_k s, P_k t)) / (1 + sum_k w_k)`` over the levels k of
    ``HCL_LEVELS`` smaller than the feature's height H, with weights 1/2, 1/4, 1/8 in that order
    and ``P_k`` the adaptive average pool to k x k; every mse is a mean over all elements.
    Token features [B, L, C] are reshaped to square maps first.

    Args:
        feat_s: the (aligned) student feature, [B, C, H, W] or [B, L, C].
        feat_t: the target of the same shape; **not detached** (gradients flow into both).

    Returns:
        A 0-d tensor.

    Raises:
        ValueError: the shapes differ, or token features do not form a square grid.
    """
    if feat_s.shape != feat_t.shape:
        raise ValueError(f"hcl: feat_s {tuple(feat_s.shape)} and feat_t {tuple(feat_t.shape)} differ")
    s, t = as_map(feat_s), as_map(feat_t)
    loss = F.mse_loss(s, t)
    weight, total = 1.0, 1.0
    for level in HCL_LEVELS:
        if level >= s.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        total += weight
    return loss / total


def hcl_loss(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`hcl` summed (not averaged) over the stages.

    Args:
        feats_s: the aligned student features, one per stage.
        feats_t: the teacher's stage features, same shapes; not detached.

    Returns:
        A 0-d tensor.

    Raises:
        ValueError: the lists differ in length or are empty, or a pair's shapes differ.
    """
    if len(feats_s) != len(feats_t) or not feats_s:
        raise ValueError(f"hcl_loss: {len(feats_s)} student and {len(feats_t)} teacher features")
    total = None
    for s, t in zip(feats_s, feats_t):
        term = hcl(s, t)
        total = term if total is None else total + term
    return total
