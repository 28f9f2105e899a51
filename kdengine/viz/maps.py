"""The maps of a checkpoint on validation images (ADM paper Fig. 1, 4): the cosine-similarity map S
between teacher and student, ADM's consensus and divergence maps, and each model's class
activation map (CAM), drawn over the images in one grid.

**S** is computed as ADM computes it: on the last stage's features (before the final ReLU), the
student's mapped into the teacher's channels where they differ, the larger map area-pooled to the
smaller. The mapping is the run's own ADM connector (1x1 conv + BN) when the run trained with ADM;
the identity when the channels match; otherwise (a run without ADM, e.g. DML, between models of
different widths) a least-squares linear map with bias from the student's to the teacher's
channels, fitted on the analysed images' feature pixels. ``A_co`` and ``A_di`` are
:func:`kdengine.ops.adm_attention_reference` of the same pair.

**CAM** (Zhou et al., 2016): the classifier's weights of the predicted class applied to the last
feature map, ``sum_c W[pred, c] * relu(F[c, h, w])``. It is defined for models whose head is one
linear layer over the global average pool of ``relu(features[-1])`` (the CNNs of the zoo); that is
checked on the data (the CAM's spatial mean plus the bias must give the logit) and the CAM is left
out, with a note, for models where it does not hold.

Pairs: each (teacher, student) of the run's ADM, or of the roles; with no teacher, each pair of
models (the later one mapped onto the earlier).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .regions import normalise, upsample
from .runs import LoadedCheckpoint, ValidationData

#: ADM's attention epsilon where the run has no ADM of its own (Algorithm 1's value).
DEFAULT_EPS = 1e-5


@dataclass
class PairMaps:
    """S, A_co and A_di of one (teacher, student) pair on every analysed image, ``[N, h, w]``."""

    teacher: int
    student: int
    name: str  # "teacher~student" in the models' tags
    mapping: str  # how the student's channels met the teacher's: "ADM connector", "identity", "least squares"
    sim: torch.Tensor
    attn_co: torch.Tensor
    attn_di: torch.Tensor


@dataclass
class MapSet:
    """Everything :func:`compute_maps` finds on the analysed images (CPU tensors)."""

    tags: list[str]
    labels: torch.Tensor  # [N]
    masks: Optional[torch.Tensor]  # [N, H, W] uint8, or None without masks
    image_size: tuple[int, int]
    pixels: np.ndarray  # the first `keep_pixels` images, uint8 [K, H, W, 3]
    logits: dict[str, torch.Tensor]  # tag -> [N, C] float32
    cams: dict[str, Optional[torch.Tensor]]  # tag -> [N, h, w] or None (no linear head over the pool)
    pairs: list[PairMaps]
    notes: list[str] = field(default_factory=list)


def linear_head(model: nn.Module) -> Optional[nn.Linear]:
    """The model's classifier as one ``nn.Linear`` (possibly inside a Sequential with dropout), or
    None."""
    try:
        head = model.head
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, nn.Sequential):
        parts = list(head.modules())[1:]
        linears = [m for m in parts if isinstance(m, nn.Linear)]
        passive = all(isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Flatten)) for m in parts)
        if len(linears) == 1 and passive:
            return linears[0]
    return None


def class_activation_map(features: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``cam[b] = sum_c weight[classes[b], c] * relu(features[b, c])``.

    Args:
        features: the last stage, before its ReLU, ``[B, C, h, w]``.
        weight: the linear classifier's weight ``[num_classes, C]``.
        classes: the class of each image whose map is wanted, ``[B]``.

    Returns:
        ``[B, h, w]`` float32.
    """
    return torch.einsum("bchw,bc->bhw", F.relu(features.float()), weight.float()[classes])


def model_pairs(roles: list[str], adm: Optional[nn.Module]) -> list[tuple[int, int]]:
    """The (teacher, student) pairs whose maps are drawn (see the module docstring)."""
    if adm is not None:
        return list(adm.pairs)
    teachers = [i for i, r in enumerate(roles) if r == "teacher"]
    students = [i for i, r in enumerate(roles) if r == "student"]
    if teachers and students:
        return [(t, s) for t in teachers for s in students]
    return [(i, j) for i in range(len(roles)) for j in range(i + 1, len(roles))]


def _to_size(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, tuple(size))


def _smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    return min(tuple(a.shape[-2:]), tuple(b.shape[-2:]), key=lambda hw: hw[0] * hw[1])


def least_squares_map(feat_s: torch.Tensor, feat_t: torch.Tensor, ridge: float = 1e-4) -> tuple:
    """The linear map with bias from the student's channels to the teacher's that best fits the
    teacher's feature pixels (ridge-regularised normal equations, in float64).

    Args:
        feat_s, feat_t: ``[N, C_s, h, w]`` and ``[N, C_t, h, w]`` (same spatial size).
        ridge: the diagonal added, relative to the mean diagonal of ``X^T X``.

    Returns:
        ``(weight [C_t, C_s], bias [C_t])``, float32.
    """
    x = feat_s.double().permute(0, 2, 3, 1).reshape(-1, feat_s.shape[1])
    y = feat_t.double().permute(0, 2, 3, 1).reshape(-1, feat_t.shape[1])
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    gram = x.T @ x
    gram += torch.eye(gram.shape[0], dtype=gram.dtype) * ridge * gram.diagonal().mean().clamp_min(1e-12)
    solution = torch.linalg.solve(gram, x.T @ y)  # [C_s + 1, C_t]
    return solution[:-1].T.float().contiguous(), solution[-1].float()


def _apply_linear(feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nchw,dc->ndhw", feat.float(), weight) + bias.view(1, -1, 1, 1)


def pair_maps(feat_s: torch.Tensor, feat_t: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """S, A_co and A_di of mapped student features and teacher features (sizes already equal).

    Returns:
        ``(sim, attn_co, attn_di)``, each ``[B, h, w]`` float32.
    """
    feat_s, feat_t = feat_s.float().contiguous(), feat_t.float().contiguous()
    sim = ops.cosine_similarity_map(feat_s, feat_t)
    attn_co, attn_di = ops.adm_attention_reference(feat_s, feat_t, eps)
    return sim.float(), attn_co.float(), attn_di.float()


@torch.no_grad()
def compute_maps(loaded: LoadedCheckpoint, data: ValidationData, keep_pixels: int = 8) -> MapSet:
    """Run a checkpoint's models on the validation samples and compute every map.

    Args:
        loaded: the checkpoint (:func:`~.runs.load_checkpoint`).
        data: the samples (:func:`~.runs.validation_data`); every one is analysed.
        keep_pixels: how many of the first images to keep as pixels for drawing.

    Returns:
        The :class:`MapSet`.
    """
    models, tags, precision = loaded.models, loaded.tags, loaded.precision
    pairs = model_pairs(loaded.roles, loaded.adm)
    connectors, eps = {}, DEFAULT_EPS
    if loaded.adm is not None:
        for pair, loss in zip(loaded.adm.pairs, loaded.adm.losses):
            connectors[pair] = loss.connectors[-1] if len(loss.connectors) else nn.Identity()
            eps = loss.eps
    heads = [linear_head(m) for m in models]
    cam_ok = [h is not None for h in heads]
    tolerance = 1e-3 if precision.autocast_dtype is None else 5e-2
    labels, masks, pixels = [], [], []
    logits = {t: [] for t in tags}
    cams = {t: [] for t in tags}
    direct = {p: ([], [], []) for p in pairs if p in connectors or _same_channels(models, p)}
    fitted = {p: ([], []) for p in pairs if p not in direct}
    for images, y, m in data.batches():
        with precision.autocast():
            outputs = [model(images) for model in models]
        labels.append(y.cpu())
        if m is not None:
            masks.append(m.cpu())
        if sum(p.shape[0] for p in pixels) < keep_pixels:
            pixels.append(data.pixels(images[: keep_pixels - sum(p.shape[0] for p in pixels)]))
        for i, (tag, out) in enumerate(zip(tags, outputs)):
            z = out.logits.float()
            logits[tag].append(z.cpu())
            if not cam_ok[i]:
                continue
            pred = z.argmax(dim=1)
            cam = class_activation_map(out.features[-1], heads[i].weight, pred)
            bias = heads[i].bias.float()[pred] if heads[i].bias is not None else 0.0
            chosen = z.gather(1, pred[:, None]).squeeze(1)
            if not torch.allclose(cam.mean(dim=(1, 2)) + bias, chosen, rtol=tolerance, atol=tolerance):
                cam_ok[i] = False  # the head is not linear over the pooled relu(features[-1])
                continue
            cams[tag].append(cam.cpu())
        for (t, s), (sims, cos, dis) in direct.items():
            feat_s, feat_t = outputs[s].features[-1], outputs[t].features[-1]
            if (t, s) in connectors:
                with precision.autocast():
                    feat_s = connectors[(t, s)](feat_s)
            size = _smaller(feat_s, feat_t)
            sim, co, di = pair_maps(_to_size(feat_s.float(), size), _to_size(feat_t.float(), size), eps)
            sims.append(sim.cpu())
            cos.append(co.cpu())
            dis.append(di.cpu())
        for (t, s), (store_s, store_t) in fitted.items():
            feat_s, feat_t = outputs[s].features[-1].float(), outputs[t].features[-1].float()
            size = _smaller(feat_s, feat_t)
            store_s.append(_to_size(feat_s, size).cpu())
            store_t.append(_to_size(feat_t, size).cpu())
    notes = []
    result_pairs = []
    for (t, s) in pairs:
        name = f"{tags[t]}~{tags[s]}"
        if (t, s) in direct:
            sims, cos, dis = (torch.cat(v) for v in direct[(t, s)])
            mapping = "ADM connector" if (t, s) in connectors else "identity"
        else:
            feat_s, feat_t = torch.cat(fitted[(t, s)][0]), torch.cat(fitted[(t, s)][1])
            weight, bias = least_squares_map(feat_s, feat_t)
            sims, cos, dis = pair_maps(_apply_linear(feat_s, weight, bias), feat_t, eps)
            mapping = "least squares"
            notes.append(f"{name}: no ADM connector and {feat_s.shape[1]} vs {feat_t.shape[1]} channels; the "
                         f"student's features are mapped by a least-squares linear fit on the {feat_s.shape[0]} "
                         "analysed images")
        result_pairs.append(PairMaps(t, s, name, mapping, sims, cos, dis))
    for tag, ok, head in zip(tags, cam_ok, heads):
        if not ok:
            why = "no single linear head" if head is None else "its head is not linear over the pooled last stage"
            notes.append(f"{tag}: no class activation map ({why})")
    masks_t = torch.cat(masks) if masks else None
    labels_t = torch.cat(labels)
    pixels_np = np.concatenate(pixels) if pixels else np.zeros((0, 1, 1, 3), np.uint8)
    image_size = tuple(masks_t.shape[-2:]) if masks_t is not None else tuple(pixels_np.shape[1:3])
    return MapSet(tags, labels_t, masks_t, image_size, pixels_np, {t: torch.cat(v) for t, v in logits.items()},
                  {t: (torch.cat(cams[t]) if ok else None) for t, ok in zip(tags, cam_ok)}, result_pairs, notes)


def _same_channels(models, pair) -> bool:
    t, s = pair
    ch_t, ch_s = getattr(models[t], "stage_channels", None), getattr(models[s], "stage_channels", None)
    return bool(ch_t) and bool(ch_s) and ch_t[-1] == ch_s[-1]


# ----------------------------------------------------------------------------------------- the figure


def _overlay(ax, pixels, heat, cmap, vmin, vmax, mask=None):
    ax.imshow(pixels, interpolation="nearest")
    ax.imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.55, interpolation="nearest")
    if mask is not None and mask.any():
        ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_maps(maps: MapSet, path: os.PathLike | str, images: Optional[int] = None, class_names=None,
              title: str = "") -> Path:
    """One grid: a row per image, its columns the image (the object's outline in white where a mask
    exists), then for each pair S (-1..1), A_co and A_di, then each model's CAM (scaled per image).
    Maps are upsampled bilinearly to the image.

    Args:
        maps: from :func:`compute_maps`.
        path: the PNG to write.
        images: rows (default: every kept image).
        class_names: label -> name for the row titles (default: the label number).
        title: the figure's title.

    Returns:
        ``path``.
    """
    from .figures import pyplot, save

    plt = pyplot()
    k = min(images or len(maps.pixels), len(maps.pixels))
    size = maps.image_size
    columns = [("image", None)]
    for p in maps.pairs:
        columns += [(f"S {p.name}", ("sim", p)), (f"A_co {p.name}", ("co", p)), (f"A_di {p.name}", ("di", p))]
    columns += [(f"CAM {t}", ("cam", t)) for t in maps.tags if maps.cams[t] is not None]
    fig, axes = plt.subplots(max(k, 1), len(columns), figsize=(1.7 * len(columns), 1.8 * max(k, 1) + 0.4),
                             squeeze=False, constrained_layout=True)

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and c < len(class_names) else str(c)

    for row in range(k):
        mask = maps.masks[row].numpy() if maps.masks is not None else None
        pix = maps.pixels[row]
        preds = " ".join(f"{t[0]}:{name(int(maps.logits[t][row].argmax()))}" for t in maps.tags)
        for col, (header, what) in enumerate(columns):
            ax = axes[row, col]
            if what is None:
                ax.imshow(pix, interpolation="nearest")
                if mask is not None and mask.any():
                    ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_ylabel(f"{name(int(maps.labels[row]))}\n{preds}", fontsize=7)
            elif what[0] == "cam":
                heat = normalise(upsample(maps.cams[what[1]][row : row + 1], size))[0].numpy()
                _overlay(ax, pix, heat, "jet", 0, 1, mask)
            else:
                source = {"sim": what[1].sim, "co": what[1].attn_co, "di": what[1].attn_di}[what[0]]
                heat = upsample(source[row : row + 1], size)[0].numpy()
                if what[0] == "sim":
                    _overlay(ax, pix, heat, "coolwarm", -1, 1, mask)
                else:
                    _overlay(ax, pix, heat, "viridis", float(heat.min()), float(heat.max()), mask)
            if row == 0:
                ax.set_title(header, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path)
