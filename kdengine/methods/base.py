"""The contract between a distillation method and the training engine: :class:`Method` (the base
of every method), :class:`LossOutput`, the roles, and the small helpers every method shares."""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses.segmentation import SegSettings, labels_at, seg_cross_entropy
from ..models.base import ModelOutput

if TYPE_CHECKING:  # only for annotations: adm.py imports this module
    from .adm import ADMPairs

#: What a model can be in a run; the engine's config validates ``models.<i>.role`` against it.
ROLES = ("teacher", "student")

#: What the models predict: a class per image (logits ``[B, K]``, target ``[B]``) or per pixel
#: (``SegOutput`` with logits ``[B, K, h, w]``, target ``[B, H, W]``).
TASKS = ("classification", "segmentation")

#: Prefixes of the terms whose sum is ``LossOutput.total`` (the others are diagnostics); ``reg``:
#: a regulariser of a method's own modules (PAT's prompt term, keyed by the teacher's index).
LOSS_KINDS = ("ce", "kl", "hint", "adm", "reg")


def teachers_of(roles: Sequence[str]) -> list[int]:
    """The indices whose role is ``"teacher"``, in order."""
    return [i for i, r in enumerate(roles) if r == "teacher"]


def students_of(roles: Sequence[str]) -> list[int]:
    """The indices whose role is ``"student"``, in order."""
    return [i for i, r in enumerate(roles) if r == "student"]


def topology(roles: Sequence[str]) -> str:
    """``"1T1S"``, ``"1T2S"``, ``"2T1S"``, ...: the number of teachers and of students."""
    t, s = len(teachers_of(roles)), len(students_of(roles))
    return f"{t}T{s}S"


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if it is a low-precision float (bf16/fp16 under autocast), else unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def stage_channels(model: nn.Module, index: int) -> list[int]:
    """The channels of each entry of a model's ``features`` (its ``stage_channels``).

    Args:
        model: a zoo model (``KDModel``) or anything with ``stage_channels``.
        index: the model's position among the method's models (for the error message).

    Returns:
        One int per stage.

    Raises:
        ValueError: the model lists no ``stage_channels``.
    """
    ch = getattr(model, "stage_channels", None)
    if not ch:
        raise ValueError(
            f"model {index} ({type(model).__name__}) has no `stage_channels`, which ADM and FitNet need"
        )
    return [int(c) for c in ch]


class LossOutput(NamedTuple):
    """``total``: the scalar the engine calls ``backward`` on once (the sum over models).
    ``terms``: named scalars for logging (e.g. ``"ce/1"``, ``"kl/0"``, ``"adm/1"``), detached;
    they stay on the device: the engine accumulates them without host syncs."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class Method(nn.Module):
    """A distillation method: the losses of M models' outputs for one batch.

    The engine owns the models and passes them in at construction (their heads and stage
    channels are what ADM and FitNet need); the method owns only its own parameters
    (connectors, regressors), which the engine optimises along with the trainable models.

    Subclasses implement ``losses(outputs, target, terms) -> gates``, filling ``terms`` with
    per-model weighted loss terms (``"ce/m"``, ``"kl/m"``, ``"hint/m"``) and diagnostics, and
    returning ``None`` or a dict ``{(teacher, student): 0-d gate}`` that scales the teacher's ADM
    term of that pair (SwitOKD's switch); ``forward`` checks the inputs, adds the ADM terms
    (``"adm/m"``) and returns ``total`` = the sum of every term whose prefix is in ``LOSS_KINDS``.
    A subclass with rules on the roles overrides ``check_roles``; one that freezes some models
    overrides ``trainable_of``; one that runs its own forwards (PAT's prompted teacher) overrides
    ``forward_batch``, which the engine calls for every batch.

    Attributes the engine reads:
        trainable: one bool per model; ``False`` models (offline teachers) run in eval mode
            under ``torch.no_grad`` and are not optimised.
        needs_indices: the method wants the dataset indices of each batch (``forward(...,
            indices=)``), e.g. ADM's ``di="kd"`` variant with its previous-epoch teacher
            predictions.
        soft_targets: the method also takes soft targets ``[B, num_classes]`` (mixup / cutmix,
            label smoothing done by the data path) in place of the labels ``[B]``.

    Anything that changes over training (a schedule's delta, a warm-up factor) lives in a
    buffer updated by ``start_epoch`` with ``fill_``/``copy_``, never as a Python float read in
    ``forward``: a CUDA graph captured once must see the new value on replay. For the same reason
    ``forward`` has no host syncs (no ``.item()``, no Python branches on tensor values).

    Segmentation (``task="segmentation"``, the online methods only): the outputs are
    :class:`~kdengine.models.segmentation.SegOutput` s (logits ``[B, K, h, w]`` at the feature
    grid) and the target an int64 label map ``[B, H, W]`` at the image's resolution
    (``seg.ignore_index`` for unlabelled pixels). ``cross_entropy`` is then
    :func:`~kdengine.losses.seg_cross_entropy` (logits upsampled to the labels, plus the
    auxiliary head's term), the per-pixel rules read the labels at the logits' grid
    (``grid_target``), and the ADM component is dense (``dense``: ``"region"`` or ``"pixel"``).
    Soft targets are not taken.

    Args:
        roles: one of ``ROLES`` per model.
        num_classes: width of every model's logits.
        adm: the ADM component of a ``<method>+adm`` (``ADMPairs``), or None.
        task: one of ``TASKS``.
        seg: segmentation's options (``aux_weight``, ``ignore_index``, ``align_corners``; a
            :class:`~kdengine.losses.SegSettings` or a dict, missing keys default), for
            ``task="segmentation"`` only.

    Raises:
        ValueError: an unknown task, ``seg`` options for classification, or an ADM component
            built for the other task.
    """

    trainable: tuple[bool, ...]
    needs_indices: bool = False
    soft_targets: bool = False

    def __init__(self, roles: Sequence[str], num_classes: int, adm: Optional[ADMPairs] = None, *,
                 task: str = "classification", seg=None):
        super().__init__()
        name = type(self).__name__
        self.roles = self.check_roles(roles)
        self.trainable = self.trainable_of(self.roles)
        self.num_classes = int(num_classes)
        self.topology = topology(self.roles)
        if task not in TASKS:
            raise ValueError(f"{name}: task must be one of {TASKS}, got {task!r}")
        if adm is not None and getattr(adm, "task", "classification") != task:
            raise ValueError(f"{name}: the ADM component was built for task={adm.task!r}, the method for {task!r}")
        self.task = task
        #: segmentation's options (``SegSettings``), None for classification
        self.seg: Optional[SegSettings] = None
        if task == "segmentation":
            self.seg = seg if isinstance(seg, SegSettings) else SegSettings(**(seg or {}))
            self.soft_targets = False  # label maps only: mixup / cutmix of maps is not modelled
        elif seg is not None:
            raise ValueError(f"{name}: seg options apply to task='segmentation' only, got task={task!r}")
        #: the dense ADM form (``"region"`` / ``"pixel"``) of a segmentation ``+adm``, else None
        self.dense = adm.dense if adm is not None and task == "segmentation" else None
        self.adm = adm
        self.needs_indices = bool(adm is not None and adm.needs_indices)

    # ---------------------------------------------------------------- roles

    @classmethod
    def check_roles(cls, roles: Optional[Sequence[str]], name: Optional[str] = None) -> tuple[str, ...]:
        """Normalise the roles and check them against this method's rules.

        Args:
            roles: one role per model (any case).
            name: the method's name for the messages (default: the class name).

        Returns:
            The roles, lower-case, as a tuple.

        Raises:
            ValueError: no roles, an unknown role, or (in subclasses) roles the method cannot
                train, each message naming the roles.
        """
        name = name or cls.__name__
        if roles is None:
            raise ValueError(f"{name}: roles is required, one of {ROLES} per model")
        roles = tuple(str(r).lower() for r in roles)
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise ValueError(f"{name}: unknown role(s) {bad}; each role must be one of {ROLES}")
        if not roles:
            raise ValueError(f"{name}: needs at least one model")
        return roles

    @classmethod
    def trainable_of(cls, roles: Sequence[str]) -> tuple[bool, ...]:
        """Which models this method trains (default: all of them)."""
        return tuple(True for _ in roles)

    # ---------------------------------------------------------------- schedule

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (0-based) of ``epochs``; updates the schedules' buffers."""
        if self.adm is not None:
            self.adm.start_epoch(epoch, epochs)

    def end_epoch(self, epoch: int) -> None:
        """Called after each epoch's last step."""
        if self.adm is not None:
            self.adm.end_epoch(epoch)

    def step_gates(self) -> Optional[torch.Tensor]:
        """Optional per-model optimizer gates, read by the engine after each ``forward``.

        ``None`` (the default): every trainable model steps every iteration. Otherwise a float
        tensor ``[M]`` on the device (a buffer the method rewrites in ``forward``, so its address
        is fixed for CUDA graphs) holding 1.0 where model m steps this iteration and 0.0 where its
        optimizer step is skipped entirely (parameters, momentum and weight decay unchanged), e.g.
        SwitOKD's teacher in expert ("downtime") mode, whose reference code does not call
        ``optimizer.step()`` then. The method already zeroes that model's loss terms, so an engine
        that ignores the gates still gives the model a zero gradient (but momentum and weight decay
        keep moving it).
        """
        return None

    # ---------------------------------------------------------------- task

    def cross_entropy(self, output, target: torch.Tensor) -> torch.Tensor:
        """A model's task loss: ``F.cross_entropy(logits, target)`` (classification; soft targets
        too), or :func:`~kdengine.losses.seg_cross_entropy` of its logits and auxiliary logits
        with this method's ``seg`` options (segmentation).

        Args:
            output: the model's ``ModelOutput`` / ``SegOutput``.
            target: ``[B]`` (or ``[B, K]``) labels, or the ``[B, H, W]`` label map.

        Returns:
            The 0-d loss.
        """
        if self.seg is None:
            return F.cross_entropy(output.logits, target)
        return seg_cross_entropy(output.logits, target, output.aux_logits, aux_weight=self.seg.aux_weight,
                                 ignore_index=self.seg.ignore_index, align_corners=self.seg.align_corners)

    def grid_target(self, target: torch.Tensor, logits: torch.Tensor):
        """The labels the per-pixel rules (KDCL's ensemble, SwitOKD's distances) read.

        Args:
            target: ``[B]`` (classification) or the ``[B, H, W]`` label map (segmentation).
            logits: the logits the rule runs on, ``[B, K]`` or ``[B, K, h, w]``.

        Returns:
            ``(labels, valid)``: classification ``(target, None)``; segmentation the label map
            nearest-downsampled to the logits' grid with the ignored pixels replaced by class 0
            (so that gathers and one-hots stay in range) and ``valid`` the bool ``[B, h, w]``
            mask of the pixels that were not ignored.
        """
        if self.seg is None:
            return target, None
        grid = labels_at(target, logits.shape[-2:])
        valid = grid != self.seg.ignore_index
        return torch.where(valid, grid, torch.zeros_like(grid)), valid

    # ---------------------------------------------------------------- forward

    def losses(self, outputs: Sequence[ModelOutput], target: torch.Tensor, terms: dict):
        """Fill ``terms`` with the method's own terms; return None or the ADM gates (see above)."""
        raise NotImplementedError  # pragma: no cover - every method overrides

    def _check_segmentation(self, outputs, target: torch.Tensor) -> None:
        name, k = type(self).__name__, self.num_classes
        first = tuple(outputs[0].logits.shape)
        for m, out in enumerate(outputs):
            z = out.logits
            if z.dim() != 4 or z.shape[1] != k:
                raise ValueError(
                    f"{name}: model {m} logits must be [B, {k}, h, w] (segmentation), got {tuple(z.shape)}"
                )
            if tuple(z.shape) != first:
                raise ValueError(
                    f"{name}: model {m} logits {tuple(z.shape)} differ from model 0's {first}: the per-pixel "
                    "terms need every model on one grid"
                )
            aux = getattr(out, "aux_logits", None)
            if aux is not None and (aux.dim() != 4 or aux.shape[:2] != z.shape[:2]):
                raise ValueError(
                    f"{name}: model {m} aux_logits must be [B, {k}, h, w] with B = {z.shape[0]}, got {tuple(aux.shape)}"
                )
        b = first[0]
        if target.dim() != 3 or target.shape[0] != b or target.dtype.is_floating_point or target.dtype == torch.bool:
            raise ValueError(
                f"{name}: target must be an integer label map [B, H, W] with B = {b}, got "
                f"{tuple(target.shape)} {target.dtype}"
            )

    def _check(self, outputs: Sequence[ModelOutput], target: torch.Tensor, indices) -> None:
        name = type(self).__name__
        if len(outputs) != len(self.roles):
            raise ValueError(
                f"{name}: built for {len(self.roles)} models {self.roles}, got {len(outputs)} outputs"
            )
        if self.task == "segmentation":
            self._check_segmentation(outputs, target)
            return
        for m, out in enumerate(outputs):
            z = out.logits
            if z.dim() != 2 or z.shape[1] != self.num_classes:
                raise ValueError(
                    f"{name}: model {m} logits must be [B, {self.num_classes}], got {tuple(z.shape)}"
                )
        b = outputs[0].logits.shape[0]
        soft = self.soft_targets and target.dim() == 2 and tuple(target.shape) == (b, self.num_classes)
        if not soft and (target.dim() != 1 or target.shape[0] != b):
            also = f" or [B, {self.num_classes}] soft targets" if self.soft_targets else ""
            raise ValueError(f"{name}: target must be [B] = [{b}]{also}, got {tuple(target.shape)}")
        if self.needs_indices:
            if indices is None:
                raise ValueError(
                    f"{name}: ADM di='kd' needs the dataset indices of the batch: "
                    "forward(outputs, target, indices=...)"
                )
            if indices.dim() != 1 or indices.shape[0] != b:
                raise ValueError(f"{name}: indices must be [B] = [{b}], got {tuple(indices.shape)}")

    def forward(
        self,
        outputs: Sequence[ModelOutput],
        target: torch.Tensor,
        indices: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        """The losses of one batch.

        Args:
            outputs: each model's ``ModelOutput`` (segmentation: ``SegOutput``), in the order of
                ``roles``.
            target: the labels, ``[B]`` (segmentation: the integer label map ``[B, H, W]``, used
                as int64).
            indices: the dataset indices of the batch, ``[B]`` (needed when ``needs_indices``).

        Returns:
            ``LossOutput(total, terms)``.

        Raises:
            ValueError: a wrong number of outputs, logits, target or indices of the wrong shape,
                or missing indices.
        """
        self._check(outputs, target, indices)
        if self.task == "segmentation":
            target = target.long()  # a uint8 / int32 label map too (no copy when already int64)
        terms: dict[str, torch.Tensor] = {}
        gates = self.losses(outputs, target, terms)
        if self.adm is not None:
            self.adm(outputs, target, indices, terms, gates)
        return self.loss_output(terms)

    @staticmethod
    def loss_output(terms: dict[str, torch.Tensor]) -> LossOutput:
        """``LossOutput`` of named terms: ``total`` = the sum, in order, of the terms whose prefix is
        in ``LOSS_KINDS``; every term detached for logging."""
        total = None
        for key, value in terms.items():
            if key.split("/", 1)[0] in LOSS_KINDS:
                total = value if total is None else total + value
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})

    def forward_batch(
        self,
        models: Sequence[nn.Module],
        images: torch.Tensor,
        target: torch.Tensor,
        indices: Optional[torch.Tensor] = None,
    ) -> tuple[list[ModelOutput], LossOutput]:
        """The forwards and losses of one batch: what the engine's step calls.

        The default runs every model once on ``images`` (trainable ones with gradients, frozen
        ones under ``torch.no_grad``), then ``self(outputs, target, indices)``. A method that
        needs other forwards (PAT: a second, prompted teacher forward with its activations kept)
        overrides it.

        Args:
            models: what to call for each model's forward, in the order of ``roles`` (the
                engine passes its DDP wrappers of the trainable models).
            images: the batch.
            target: the labels, ``[B]``.
            indices: the dataset indices of the batch, ``[B]`` (see ``needs_indices``).

        Returns:
            ``(outputs, losses)``: each model's ``ModelOutput`` (what the engine's metrics read)
            and the ``LossOutput``.
        """
        outputs = []
        for model, trainable in zip(models, self.trainable):
            if trainable:
                outputs.append(model(images))
            else:
                with torch.no_grad():
                    outputs.append(model(images))
        return outputs, self(outputs, target, indices)

    def parameter_counts(self) -> dict[str, int]:
        """The method's own trainable parameters per top-level submodule (e.g. PAT's ``raa``,
        ``aligners``, ``prompts``), in elements; submodules without any are left out."""
        counts = {}
        for name, module in self.named_children():
            n = sum(p.numel() for p in module.parameters() if p.requires_grad)
            if n:
                counts[name] = n
        return counts

    def extra_repr(self) -> str:
        return f"roles={self.roles}, trainable={self.trainable}"
