"""Where do the maps fall? Regions of a class activation map and of the teacher-student similarity
map, and their intersection over union with the object's foreground mask (ADM paper Fig. 2).

Maps live at the feature resolution (e.g. 4 x 4 for a 16-px image); they are upsampled bilinearly
to the image (``align_corners=False``) and thresholded there:

* **CAM region**: the map scaled per image to [0, 1] (min to max), at or above
  :data:`CAM_THRESHOLD` (0.5: the half-maximum region);
* **similar (consensus) region**: S at or above its per-image mean over the feature map, which is
  where ADM's consensus map ``A_co = (1 + S) / (1 + mean S)`` is at least 1;
* **discrepant region**: the rest, where S is below its mean and ADM's divergence map
  ``A_di = (1 - S) / mean(1 - S)`` exceeds 1.

IoU = |region and mask| / |region or mask| per image; NaN where both are empty (left out of the
means).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

#: The share of a CAM's per-image range at or above which a pixel is in the CAM region.
CAM_THRESHOLD = 0.5


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of ``[B, h, w]`` maps to ``[B, *size]`` (float32)."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each ``[h, w]`` map of ``[B, h, w]`` scaled to [0, 1] from its min to its max (a constant map
    becomes 0)."""
    maps = maps.float()
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return (maps - low) / span.clamp_min(1e-12)


def cam_region(cam: torch.Tensor, size: Sequence[int], threshold: float = CAM_THRESHOLD) -> torch.Tensor:
    """The CAM region: ``[B, h, w]`` maps -> bool ``[B, *size]`` (see the module docstring)."""
    return normalise(upsample(cam, size)) >= threshold


def similarity_regions(sim: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The similar (consensus) and discrepant regions of a similarity map S.

    Args:
        sim: S, ``[B, h, w]``.
        size: the image's ``(H, W)``.

    Returns:
        ``(similar, discrepant)``, bool ``[B, H, W]``, complementary.
    """
    mean = sim.float().mean(dim=(1, 2), keepdim=True)
    similar = upsample(sim, size) >= mean
    return similar, ~similar


def iou(region: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union of two binary maps.

    Args:
        region, mask: ``[B, H, W]``, bool or {0, 1}.

    Returns:
        ``[B]`` float32; NaN where both are empty.
    """
    if region.shape != mask.shape:
        raise ValueError(f"region {tuple(region.shape)} and mask {tuple(mask.shape)} must have one shape")
    a, b = region.bool(), mask.bool()
    inter = (a & b).sum(dim=(1, 2)).float()
    union = (a | b).sum(dim=(1, 2)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, math.nan))


def mean_iou(values: torch.Tensor) -> float:
    """The mean over images, in percent, NaNs left out (NaN if all are)."""
    values = values.float()
    kept = values[~values.isnan()]
    return 100.0 * float(kept.mean()) if kept.numel() else math.nan
