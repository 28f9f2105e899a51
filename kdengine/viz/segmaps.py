"""The maps of a segmentation checkpoint (``data.task=segmentation``): where the teacher and the
student agree on each image, what ADM's dense form weights, and what each model predicts.

**S** is computed as the dense ADM computes it (:class:`kdengine.losses.DenseADMLoss`): the cosine
over the channels of the **head features** (the pixel classifiers' input, at the feature grid),
the student's mapped by the run's own head connector where the run trained with ADM, the identity
where the channels match, else a least-squares linear map fitted on the analysed images' feature
pixels (:func:`~.maps.least_squares_map`). ``A_co`` and ``A_di`` are :func:`kdengine.ops.adm_maps`
with the labelled pixels as the valid ones, as in training.

**Object**: on the embedded segmentation task every label map has one object (its class, > 0) on
background (0); the analysis asks, as the ADM paper's Fig. 2 does for classification, how well the
similar (consensus) and the discrepant regions of S (:func:`~.regions.similarity_regions`) and
each model's predicted foreground cover it. Data without a background class (Cityscapes) gets
the maps and predictions but no IoU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .. import ops
from ..losses.segmentation import ALIGN_CORNERS, labels_at, upsample_logits
from .maps import least_squares_map, model_pairs
from .regions import iou, mean_iou, similarity_regions, upsample
from .runs import LoadedCheckpoint, ValidationData

#: ADM's attention epsilon where the run has no ADM of its own (Algorithm 1's value).
DEFAULT_EPS = 1e-5


@dataclass
class SegPairMaps:
    """S, A_co and A_di of one (teacher, student) pair on every analysed image, ``[N, h, w]``."""

    teacher: int
    student: int
    name: str
    mapping: str  # "ADM connector", "identity" or "least squares"
    sim: torch.Tensor
    attn_co: torch.Tensor
    attn_di: torch.Tensor


@dataclass
class SegMapSet:
    """What :func:`compute_segmentation_maps` finds on the analysed images (CPU tensors)."""

    tags: list[str]
    labels: torch.Tensor  # [N, H, W] int64 label maps
    objects: Optional[torch.Tensor]  # [N, H, W] bool: labelled non-background pixels; None without a background
    predictions: dict[str, torch.Tensor]  # tag -> [N, H, W] int64
    pixels: np.ndarray  # the first kept images, uint8 [K, H, W, 3]
    pairs: list[SegPairMaps]
    ignore_index: int
    notes: list[str] = field(default_factory=list)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.labels.shape[-2:])


def _head_connectors(adm: Optional[nn.Module]) -> dict:
    """``{(teacher, student): head connector}`` of a run's dense ADM where the head channels differ
    (empty without ADM; equal channels need none)."""
    if adm is None:
        return {}
    connectors = {pair: getattr(loss, "head_connector", nn.Identity()) for pair, loss in zip(adm.pairs, adm.losses)}
    return {pair: c for pair, c in connectors.items() if not isinstance(c, nn.Identity)}


@torch.no_grad()
def compute_segmentation_maps(loaded: LoadedCheckpoint, data: ValidationData, keep_pixels: int = 8,
                              background: Optional[int] = 0) -> SegMapSet:
    """Run a segmentation checkpoint's models on validation images and compute the maps.

    Args:
        loaded: the checkpoint (:func:`~.runs.load_checkpoint`).
        data: the samples (:func:`~.runs.validation_data`), yielding label maps as labels.
        keep_pixels: how many of the first images to keep as pixels for drawing.
        background: the background class whose complement is the object (None: no object).

    Returns:
        The :class:`SegMapSet`.
    """
    models, tags, precision = loaded.models, loaded.tags, loaded.precision
    ignore = int(loaded.cfg.data.ignore_index)
    align = bool((loaded.cfg.method.options.get("seg") or {}).get("align_corners", ALIGN_CORNERS))
    pairs = model_pairs(loaded.roles, loaded.adm)
    connectors = _head_connectors(loaded.adm)
    eps = float(getattr(loaded.adm.losses[0], "eps", DEFAULT_EPS)) if loaded.adm is not None else DEFAULT_EPS
    labels, pixels = [], []
    preds = {t: [] for t in tags}
    heads = {p: ([], [], []) for p in pairs}  # (student head features, teacher's, valid)
    for images, y, _ in data.batches():
        with precision.autocast():
            outputs = [model(images) for model in models]
        labels.append(y.cpu())
        if sum(p.shape[0] for p in pixels) < keep_pixels:
            pixels.append(data.pixels(images[: keep_pixels - sum(p.shape[0] for p in pixels)]))
        for tag, out in zip(tags, outputs):
            preds[tag].append(upsample_logits(out.logits.float(), y.shape[-2:], align).argmax(1).cpu())
        for (t, s), (store_s, store_t, store_v) in heads.items():
            feat_s, feat_t = outputs[s].head_feature, outputs[t].head_feature
            if (t, s) in connectors:
                with precision.autocast():
                    feat_s = connectors[(t, s)](feat_s)
            store_s.append(feat_s.float().cpu())
            store_t.append(feat_t.float().cpu())
            store_v.append((labels_at(y, feat_t.shape[-2:]) != ignore).cpu())
    notes, result_pairs = [], []
    for (t, s), (store_s, store_t, store_v) in heads.items():
        name = f"{tags[t]}~{tags[s]}"
        feat_s, feat_t, valid = torch.cat(store_s), torch.cat(store_t), torch.cat(store_v)
        if (t, s) in connectors:
            mapping = "ADM connector"
        elif feat_s.shape[1] == feat_t.shape[1]:
            mapping = "identity"
        else:
            weight, bias = least_squares_map(feat_s, feat_t)
            feat_s = torch.einsum("nchw,dc->ndhw", feat_s, weight) + bias.view(1, -1, 1, 1)
            mapping = "least squares"
            notes.append(f"{name}: no ADM connector and {weight.shape[1]} vs {weight.shape[0]} head channels; the "
                         f"student's head features are mapped by a least-squares linear fit on the analysed images")
        feat_s, feat_t = feat_s.contiguous(), feat_t.contiguous()
        sim = ops.cosine_similarity_map(feat_s, feat_t).float()
        attn_co, attn_di = ops.adm_maps(feat_s, feat_t, valid, eps=eps)
        result_pairs.append(SegPairMaps(t, s, name, mapping, sim, attn_co.float(), attn_di.float()))
    labels_t = torch.cat(labels)
    objects = None
    if background is not None:
        objects = (labels_t != background) & (labels_t != ignore)
    else:
        notes.append("no background class: no object IoU")
    pixels_np = np.concatenate(pixels) if pixels else np.zeros((0, 1, 1, 3), np.uint8)
    return SegMapSet(list(tags), labels_t, objects, {t: torch.cat(v) for t, v in preds.items()}, pixels_np,
                     result_pairs, ignore, notes)


def object_iou_scores(maps: SegMapSet, background: int = 0) -> dict:
    """Mean IoUs (percent) with the object of the pairs' similar and discrepant regions and of
    each model's predicted foreground (pixels not predicted ``background``), plus each model's
    pixel accuracy on the analysed images.

    Returns:
        ``{"similar/<pair>", "discrepant/<pair>", "foreground/<tag>", "whole image",
        "pixel_accuracy/<tag>"}``; empty when the maps have no object.
    """
    if maps.objects is None:
        return {}
    size, objects = maps.image_size, maps.objects
    scores = {}
    for pair in maps.pairs:
        similar, discrepant = similarity_regions(pair.sim, size)
        scores[f"similar/{pair.name}"] = mean_iou(iou(similar, objects))
        scores[f"discrepant/{pair.name}"] = mean_iou(iou(discrepant, objects))
    labelled = maps.labels != maps.ignore_index
    for tag, pred in maps.predictions.items():
        scores[f"foreground/{tag}"] = mean_iou(iou((pred != background) & labelled, objects))
    scores["whole image"] = mean_iou(iou(labelled, objects))
    for tag, pred in maps.predictions.items():
        hits = ((pred == maps.labels) & labelled).sum()
        scores[f"pixel_accuracy/{tag}"] = 100.0 * float(hits) / max(int(labelled.sum()), 1)
    return scores


def _label_colours(num_classes: int) -> np.ndarray:
    """One RGB colour per class (tab20, background black), plus white for ignored pixels."""
    from .figures import pyplot

    cmap = pyplot().get_cmap("tab20")
    colours = np.array([cmap(i % 20)[:3] for i in range(num_classes)], dtype=np.float32)
    colours[0] = 0.0
    return colours


def _paint(label_map: np.ndarray, colours: np.ndarray, ignore_index: int) -> np.ndarray:
    out = np.ones(label_map.shape + (3,), np.float32)
    known = (label_map != ignore_index) & (label_map < len(colours))
    out[known] = colours[label_map[known]]
    return out


def plot_segmentation_maps(maps: SegMapSet, path: os.PathLike | str, num_classes: int, images: Optional[int] = None,
                           title: str = "") -> Path:
    """One grid: a row per image; the image (the object's outline in white where there is one),
    its label map, for each pair S (-1..1), A_co and A_di over the image, then each model's
    predicted label map. Maps are upsampled bilinearly to the image.

    Args:
        maps: from :func:`compute_segmentation_maps`.
        path: the PNG to write.
        num_classes: K (the label maps' colours).
        images: rows (default: every kept image).
        title: the figure's title.

    Returns:
        ``path``.
    """
    from .figures import pyplot, save

    plt = pyplot()
    k = min(images or len(maps.pixels), len(maps.pixels))
    colours = _label_colours(num_classes)
    columns = [("image", None), ("labels", ("labels", None))]
    for p in maps.pairs:
        columns += [(f"S {p.name}", ("sim", p)), (f"A_co {p.name}", ("co", p)), (f"A_di {p.name}", ("di", p))]
    columns += [(f"pred. {t}", ("pred", t)) for t in maps.tags]
    fig, axes = plt.subplots(max(k, 1), len(columns), figsize=(1.7 * len(columns), 1.8 * max(k, 1) + 0.4),
                             squeeze=False, constrained_layout=True)
    size = maps.image_size
    for row in range(k):
        pix = maps.pixels[row]
        outline = maps.objects[row].numpy() if maps.objects is not None else None
        for col, (header, what) in enumerate(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if what is None:
                ax.imshow(pix, interpolation="nearest")
            elif what[0] == "labels":
                ax.imshow(_paint(maps.labels[row].numpy(), colours, maps.ignore_index), interpolation="nearest")
            elif what[0] == "pred":
                ax.imshow(_paint(maps.predictions[what[1]][row].numpy(), colours, maps.ignore_index),
                          interpolation="nearest")
            else:
                source = {"sim": what[1].sim, "co": what[1].attn_co, "di": what[1].attn_di}[what[0]]
                heat = upsample(source[row: row + 1], size)[0].numpy()
                low, high = (-1.0, 1.0) if what[0] == "sim" else (float(heat.min()), float(heat.max()))
                ax.imshow(pix, interpolation="nearest")
                ax.imshow(heat, cmap="coolwarm" if what[0] == "sim" else "viridis", vmin=low, vmax=high, alpha=0.55,
                          interpolation="nearest")
            over_image = what is None or what[0] in ("sim", "co", "di")
            if over_image and outline is not None and outline.any():
                ax.contour(outline, levels=[0.5], colors="white", linewidths=0.8)
            if row == 0:
                ax.set_title(header, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path)
