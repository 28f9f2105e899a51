"""Semantic segmentation's task loss and the label maps' resizing, shared by every method.

Decisions (the lead's README takes them from here):

- **Logits are upsampled to the labels, labels are not downsampled, for the task loss**: the
  models predict at the feature grid ``h, w = ceil(H / 8), ceil(W / 8)``; the cross-entropy
  upsamples the logits bilinearly to the image's ``(H, W)`` and compares them with the full-
  resolution label map, as CIRKD (the public Cityscapes KD code the models follow) and
  torchvision's segmentation references do.
- **align_corners=True** (:data:`ALIGN_CORNERS`): CIRKD's losses and evaluation upsample with
  ``align_corners=True`` (and PSPNet's pyramid pooling already does, in the models). With
  ``align_corners=False`` the upsampled map would sit on the stride-8 grid's half-pixel
  centres, arguably closer to the geometry of a strided network, but matching the reference
  keeps the mIoU comparable to the published numbers; the evaluation must upsample the same
  way (use :func:`upsample_logits`).
- **Ignored pixels** (``ignore_index``, Cityscapes' 255) count nowhere: the cross-entropy is
  the sum over the labelled pixels divided by their number, and a batch without any labelled
  pixel (a crop wholly inside the padding) gives 0, not the NaN of ``reduction="mean"``.
- **Auxiliary head**: ``aux_weight`` (0.4, PSPNet's and CIRKD's) times the same loss of the
  auxiliary FCN head's logits.
- **Per-pixel rules at the logits' grid** (the methods' KL terms, KDCL's ensemble, SwitOKD's
  distances, dense ADM): the label map is nearest-downsampled to the grid
  (:func:`labels_at`), so a grid pixel takes one image pixel's label (or the ignore index),
  never a blend.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

#: CIRKD's bilinear upsampling of the logits (module docstring).
ALIGN_CORNERS = True
#: Cityscapes' (and CIRKD's) label for "not annotated".
IGNORE_INDEX = 255
#: The auxiliary FCN head's loss weight (PSPNet, CIRKD).
AUX_WEIGHT = 0.4


class SegSettings(NamedTuple):
    """The segmentation options of a method (``build_method(..., seg={...})``)."""

    aux_weight: float = AUX_WEIGHT
    ignore_index: int = IGNORE_INDEX
    align_corners: bool = ALIGN_CORNERS


#: The defaults, as the builder's ``seg`` options.
SEG_DEFAULTS = SegSettings()._asdict()


def upsample_logits(logits: torch.Tensor, size, align_corners: bool = ALIGN_CORNERS) -> torch.Tensor:
    """Bilinear upsampling of ``[B, K, h, w]`` logits to ``size = (H, W)`` (a no-op when already
    there).

    Args:
        logits: ``[B, K, h, w]``.
        size: the target ``(H, W)``.
        align_corners: see the module docstring (default CIRKD's True).

    Returns:
        ``[B, K, H, W]``.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


def labels_at(labels: torch.Tensor, size) -> torch.Tensor:
    """A label map nearest-downsampled (or -upsampled) to ``size = (h, w)``.

    Args:
        labels: integer ``[B, H, W]`` class ids (the ignore index included).
        size: the grid ``(h, w)``.

    Returns:
        ``[B, h, w]`` int64; each entry is one input pixel's label (``F.interpolate``'s
        ``"nearest"``: input row ``floor(i * H / h)``), so the ignore index stays exact.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    # interpolate takes floats; class ids and 255 are exact in fp32
    return F.interpolate(labels.unsqueeze(1).float(), size=tuple(size), mode="nearest").squeeze(1).long()


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy averaged over the pixels whose label is not ``ignore_index``; 0 when there
    are none (no NaN, no host sync).

    Args:
        logits: ``[B, K, H, W]``.
        labels: ``[B, H, W]`` int64.
        ignore_index: the label that counts nowhere.

    Returns:
        The 0-d loss.
    """
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def seg_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    aux_logits: Optional[torch.Tensor] = None,
    *,
    aux_weight: float = AUX_WEIGHT,
    ignore_index: int = IGNORE_INDEX,
    align_corners: bool = ALIGN_CORNERS,
) -> torch.Tensor:
    """The segmentation task loss: ``CE(up(logits), y) + aux_weight * CE(up(aux_logits), y)``.

    ``up`` is :func:`upsample_logits` to the label map's size, ``CE`` :func:`masked_ce` (mean
    over the labelled pixels, ignored ones left out).

    Args:
        logits: ``[B, K, h, w]`` at the feature grid.
        target: int64 ``[B, H, W]`` at the image's resolution.
        aux_logits: the auxiliary head's ``[B, K, h', w']``, or None (then only the main term).
        aux_weight: its weight (0: left out).
        ignore_index: the label that counts nowhere.
        align_corners: the upsampling's (module docstring).

    Returns:
        The 0-d loss.
    """
    size = target.shape[-2:]
    loss = masked_ce(upsample_logits(logits, size, align_corners), target, ignore_index)
    if aux_logits is not None and aux_weight != 0.0:
        loss = loss + aux_weight * masked_ce(upsample_logits(aux_logits, size, align_corners), target, ignore_index)
    return loss
