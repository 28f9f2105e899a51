"""PAT: Perspective-Aware Teaching (ICCV 2025), heterogeneous knowledge distillation with region-aware
attention (RAA) over the student's stages and adaptive feedback prompts (AFP) inside the frozen
teacher.

The method as described (the default), layer by layer; each place where the authors' public code
(github jimmylin0979/PAT, an OFA-KD fork) does something else is listed under "compat" in
:class:`PAT`'s docstring and reproduced by ``compat="authors"``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..losses.hcl import as_map, hcl_loss, map_to_tokens, tokens_to_map
from ..losses.kl import kd_kl, soft_probs
from ..models.prompts import NUM_SITES, staged_forward, supports_prompts
from .base import Method, students_of, teachers_of
from .ofa import drop_class_tokens, init_projector, input_size, probe, stage_features, target_ce

#: ``compat`` values: None (the method as described) or "authors" (the public code's behaviour).
COMPAT_MODES = (None, "authors")
#: Rows of the positional-encoding table of the public code (indexed by batch position there).
ENCODING_LENGTH = 5000


def sinusoidal_encoding(length: int, dim: int) -> torch.Tensor:
    """The fixed sinusoidal table ``[length, dim]``: ``PE[p, 2i] = sin(p * 10000^(-2i/dim))``,
    ``PE[p, 2i+1] = cos(p * 10000^(-2i/dim))``.

    Raises:
        ValueError: ``dim`` is odd.
    """
    if dim % 2:
        raise ValueError(f"the sinusoidal encoding needs an even width, got {dim}")
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


def _map_shape(shape: tuple[int, ...], what: str) -> tuple[int, int]:
    """(channels, side) of a per-sample stage shape: (C, H, W) or (L, C) tokens on a square grid."""
    if len(shape) == 3:
        c, h, w = shape
        if h != w:
            raise ValueError(f"PAT needs square {what} maps, got {h}x{w}")
        return c, h
    n, c = shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"PAT needs {what} tokens on a square grid, got {n} tokens")
    return c, side


class StagePatchEmbed(nn.Module):
    """RAA's patch embedding of one student stage: nearest upsampling (the legacy ``nearest``
    index rule) to ``grid * patch`` when the map is smaller, then a conv with kernel = stride =
    ``patch = ceil(side / grid)`` (bias, no norm, PyTorch's default initialisation) into
    ``grid^2`` tokens of width ``dim``, in row-major order.

    Args:
        channels: the stage's channels.
        side: the stage map's side.
        grid: tokens per side (``sqrt(Q_s)``).
        dim: token width D.
    """

    def __init__(self, channels: int, side: int, grid: int, dim: int):
        super().__init__()
        self.patch = -(-side // grid)
        self.side = side
        self.size = grid * self.patch
        self.proj = nn.Conv2d(channels, dim, self.patch, stride=self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.side:
            raise ValueError(f"RAA was built for {self.side}x{self.side} maps at this stage, got {tuple(x.shape)}")
        if self.side < self.size:
            x = F.interpolate(x, size=self.size, mode="nearest")
        return map_to_tokens(self.proj(x))


class RegionAwareAttention(nn.Module):
    """RAA: the student's stages blended by one self-attention over their patch tokens.

    Each stage map -> :class:`StagePatchEmbed` -> Q_s = Q / S tokens; the stages are concatenated
    stage-major ([B, Q, D]), normalised by one shared LayerNorm, projected by ``q = Linear(D, D)``
    and ``k, v = Linear(D, 2D)`` (bias, PyTorch's default initialisation); a fixed sinusoidal
    encoding is added to q and k (not v); ``ops.raa_attention`` with ``heads`` heads (scale
    ``(D / heads)^-0.5``, softmax over all Q keys: every stage attends to every stage); no output
    projection, no residual; split back into the S stages.

    Args:
        stage_shapes: (channels, side) of each student stage map.
        num_queries: Q (Q / S must be a perfect square).
        dim: D.
        heads: attention heads.
        batch_encoding: index the encoding by batch position, ``PE[:B]`` as [B, 1, D] (the public
            code) instead of by token position, ``PE[:Q]`` as [Q, D].
        impl: backend of ``ops.raa_attention``.
    """

    def __init__(self, stage_shapes: Sequence[tuple[int, int]], num_queries: int = 64, dim: int = 512,
                 heads: int = 8, batch_encoding: bool = False, impl: Optional[str] = None):
        super().__init__()
        stages = len(stage_shapes)
        per_stage = num_queries // stages
        grid = math.isqrt(per_stage)
        if per_stage * stages != num_queries or grid * grid != per_stage:
            raise ValueError(f"RAA: num_queries / stages = {num_queries} / {stages} must be a perfect square")
        if dim % heads:
            raise ValueError(f"RAA: dim {dim} is not divisible by {heads} heads")
        self.per_stage, self.grid, self.heads, self.impl = per_stage, grid, heads, impl
        self.batch_encoding = bool(batch_encoding)
        self.embeds = nn.ModuleList(StagePatchEmbed(c, side, grid, dim) for c, side in stage_shapes)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        length = ENCODING_LENGTH if self.batch_encoding else num_queries
        self.register_buffer("encoding", sinusoidal_encoding(length, dim), persistent=False)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student stage maps -> the blended tokens of each stage, [B, Q_s, D] each."""
        t = self.norm(torch.cat([embed(m) for embed, m in zip(self.embeds, maps)], dim=1))
        q = self.q(t)
        k, v = self.kv(t).chunk(2, dim=-1)
        if self.batch_encoding:
            if q.shape[0] > self.encoding.shape[0]:
                raise ValueError(f"the batch-indexed encoding has {self.encoding.shape[0]} rows, batch is {q.shape[0]}")
            pos = self.encoding[: q.shape[0]].unsqueeze(1)
        else:
            pos = self.encoding
        out = ops.raa_attention(q, k, v, pos.to(q.dtype), self.heads, impl=self.impl)
        return list(out.split(self.per_stage, dim=1))


class MapProjector(nn.Module):
    """Nearest resize to ``side`` x ``side`` -> BatchNorm2d -> 1x1 conv without bias: PAT's map
    aligner (and the feedback aligner between a teacher stage's output and input)."""

    def __init__(self, in_channels: int, out_channels: int, side: int):
        super().__init__()
        self.side = side
        self.norm = nn.BatchNorm2d(in_channels)
        self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.side or x.shape[-2] != self.side:
            x = F.interpolate(x, size=self.side, mode="nearest")
        return self.proj(self.norm(x))


class TokensToMap(nn.Module):
    """Aligner from blended tokens [B, Q_s, D] to a map teacher stage [B, C_t, H_t, H_t]: the
    tokens as their grid, then :class:`MapProjector` (the result is piecewise constant)."""

    def __init__(self, dim: int, channels: int, side: int):
        super().__init__()
        self.project = MapProjector(dim, channels, side)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.project(tokens_to_map(tokens))


class TokensToTokens(nn.Module):
    """Aligner from blended tokens [B, Q_s, D] to a token teacher stage [B, L_t, C_t]:
    BatchNorm1d over the Q_s tokens (as channels) -> Linear(D -> C_t) -> BatchNorm1d(C_t) ->
    Linear(Q_s -> L_t) over the token axis."""

    def __init__(self, num_queries: int, dim: int, num_tokens: int, channels: int):
        super().__init__()
        self.token_norm = nn.BatchNorm1d(num_queries)
        self.channel_proj = nn.Linear(dim, channels)
        self.channel_norm = nn.BatchNorm1d(channels)
        self.token_proj = nn.Linear(num_queries, num_tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.channel_proj(self.token_norm(tokens)).transpose(1, 2)
        return self.token_proj(self.channel_norm(x)).transpose(1, 2)


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 conv (C -> max(1, C // ratio)) -> ReLU -> 1x1 conv -> sigmoid,
    multiplying the input; ``gate_only``: return the [B, C, 1, 1] gate itself (the public code)."""

    def __init__(self, channels: int, ratio: int = 16, gate_only: bool = False):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.gate_only = gate_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return gate if self.gate_only else x * gate


class PromptBlock(nn.Module):
    """AFP at one teacher stage input x: ``x + beta * prompt(x_f)`` with ``x_f = fusion(cat(x,
    feedback))`` when there is feedback, else ``x``.

    fusion: 1x1 (2C -> C) -> dense 5x5 -> 1x1 -> SE -> 1x1; prompt: 1x1 (groups 4) -> depthwise
    5x5 -> 1x1 -> SE -> 1x1 (groups 4); every conv with bias and PyTorch's default initialisation,
    no activation between them; ``beta`` one learnable scalar, initialised 0. The feedback (the
    teacher stage *output*'s shape) is mapped to the input's shape by ``fb_align``: the identity
    when they agree, else a :class:`MapProjector` (Kaiming-initialised).

    Token inputs [B, L, C] are prompted on their square grid of patch tokens; the class tokens
    pass through unchanged.

    Args:
        in_shape: the stage input per sample: (C, H, W) or (L, C) including class tokens.
        fb_shape: the feedback per sample (the teacher stage's feature without class tokens).
        num_prefix_tokens: the teacher's leading class tokens.
        compat: the public code's behaviour (SE returns its gate; the last token, not the leading
            ones, is set aside when L is not square, and put back at the end; the map goes back
            to tokens by a plain reshape, without the transpose).
    """

    def __init__(self, in_shape: tuple[int, ...], fb_shape: tuple[int, ...], num_prefix_tokens: int = 0,
                 compat: bool = False):
        super().__init__()
        self.tokens = len(in_shape) == 2
        self.prefix = int(num_prefix_tokens)
        self.compat = bool(compat)
        if self.tokens:
            n, c = in_shape
            if compat:
                n -= int(math.isqrt(n) ** 2 != n)
            else:
                n -= self.prefix
            c, side = _map_shape((n, c), "teacher stage-input")
        else:
            c, side = _map_shape(in_shape, "teacher stage-input")
        if c % 4:
            raise ValueError(f"PAT's prompt convs use groups of 4: stage-input channels {c} are not a multiple of 4")
        fb_c, fb_side = _map_shape(fb_shape, "teacher stage-output")
        if (fb_c, fb_side) == (c, side):
            self.fb_align = nn.Identity()
        else:
            self.fb_align = MapProjector(fb_c, c, side)
            init_projector(self.fb_align)
        self.fusion = nn.Sequential(
            nn.Conv2d(2 * c, c, 1), nn.Conv2d(c, c, 5, padding=2), nn.Conv2d(c, c, 1),
            SqueezeExcite(c, gate_only=compat), nn.Conv2d(c, c, 1))
        self.prompt = nn.Sequential(
            nn.Conv2d(c, c, 1, groups=4), nn.Conv2d(c, c, 5, padding=2, groups=c), nn.Conv2d(c, c, 1),
            SqueezeExcite(c, gate_only=compat), nn.Conv2d(c, c, 1, groups=4))
        self.beta = nn.Parameter(torch.zeros(1))

    def _split(self, x: torch.Tensor):
        """(kept tokens in front, patch tokens, kept tokens at the end)."""
        n = x.shape[1]
        if self.compat:
            if math.isqrt(n) ** 2 != n:
                return x[:, :0], x[:, :-1], x[:, -1:]
            return x[:, :0], x, x[:, :0]
        return x[:, : self.prefix], x[:, self.prefix:], x[:, :0]

    def forward(self, x: torch.Tensor, feedback: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: the stage input; feedback: [B, *fb_shape] or None (no feedback yet)."""
        if self.tokens:
            head, body, tail = self._split(x)
            m = tokens_to_map(body)
        else:
            m = x
        x_f = m if feedback is None else self.fusion(torch.cat([m, self.fb_align(as_map(feedback))], dim=1))
        m = m + self.beta * self.prompt(x_f)
        if not self.tokens:
            return m
        body = m.reshape(m.shape[0], -1, m.shape[1]) if self.compat else map_to_tokens(m)
        return torch.cat([head, body, tail], dim=1)


class PAT(Method):
    """Perspective-Aware Teaching: one frozen teacher (always in eval mode), one student.

    Per batch (:meth:`forward_batch`): the student's forward; a clean teacher forward under
    ``no_grad``; and a prompted teacher forward (``models.prompts.staged_forward`` with a
    :class:`PromptBlock` at each stage input) whose activations are kept, since the feature loss
    trains the prompts through the frozen teacher. The loss, per the paper and the authors' code:

    ``ce_weight * CE_ls(z_s, y) + kd_weight * KD_T(z_s, z_t) + mse_weight * sum_i hcl(A_i(R_i), F_i)
    + reg_weight * KD_1(z_t' -> z_t)``

    - ``z_t`` the clean teacher's logits, ``z_t'`` the prompted teacher's; KD_T is ``T^2 KL(p_t ||
      p_s)`` at T (``losses.kd_kl``); the regulariser keeps the prompted teacher's prediction at
      the clean one's, at T = 1.
    - R_i: the student's four stage features (``ofa.stage_features``; token features without
      their class token, on their square grid) blended by :class:`RegionAwareAttention`.
    - A_i: the aligner to teacher stage i: :class:`TokensToMap` (map teachers) or
      :class:`TokensToTokens` (token teachers), initialised as the authors' (``init_projector``).
    - F_i: the *prompted* teacher's stage features (class token removed), **not detached**
      (``losses.hcl_loss``: gradients reach the student, RAA, the aligners and the prompts).
    - Feedback: after each step, ``A_i(R_i) - F_i`` (detached) is kept in fixed buffers
      (``feedback_i``, rows paired with the next batch by position, as in the public code) and
      fed to the prompt blocks of the next step; the first step has none. The buffers are
      allocated at the first batch and updated with ``copy_``, so a captured CUDA graph reads
      the previous step's values.

    Trained: the student, RAA, the aligners and the prompt blocks (``beta`` included); the
    teacher is frozen (``requires_grad_(False)`` here) and run in eval mode.

    Terms: ``ce/<s>``, ``kl/<s>`` (KD), ``hint/<s>`` (hcl), ``reg/<t>`` (the prompt regulariser).

    ``compat="authors"`` reproduces the public code (commit a7aff3f) where it differs from the
    method as described, for matching the published tables:

    1. the encoding is indexed by batch position (``PE[:B]`` on every token of sample b: no token
       order, and a sample's output depends on its place in the batch) instead of by token;
    2. the *last* token is dropped as "class token" from non-square token sequences (student
       stage features, teacher stage features, prompt inputs), instead of the leading class
       token(s) (for a timm ViT this keeps the class token as a patch and drops a patch);
    3. the squeeze-excitation returns its gate without multiplying its input, so the fusion and
       prompt stacks end in [B, C, 1, 1] and the prompt is a per-channel constant shift;
    4. the prompted token map goes back to tokens by a plain reshape without the transpose, which
       scrambles token-based teachers (ViT, Swin, Mixer) at every prompt site even at beta = 0
       (map teachers are unaffected);
    5. the teacher runs its clean forward in train mode on each epoch's first batch (drop path
       on, BatchNorm statistics updated); only in eager steps: a captured CUDA graph replays the
       eval-mode forward it was captured with.

    At beta = 0 the two modes give the same clean and prompted teacher for map teachers
    (ResNet, ConvNeXt), and the default's prompted teacher equals the clean one for every family.

    Outside those five, both modes follow the public code, except where it cannot run: a batch
    smaller than the first (the public code drops partial batches) reads and writes the first rows
    of the feedback buffers, and the squeeze-excitation keeps at least one hidden channel (only
    widths below 16, never met by the paper's models, differ).

    Args:
        roles: one teacher and one student.
        num_classes: width of the logits.
        models: the models (the teacher must be a family of ``models.prompts``).
        ce_weight, kd_weight, mse_weight, reg_weight: the loss weights (all 1 in the paper's code on
            both datasets, no schedule).
        temperature: T of the KD term.
        label_smoothing: of the CE term against labels (0.1 in the recipes; soft targets [B, K] from
            mixup carry their own and are not smoothed again).
        num_queries: Q, RAA tokens over the four stages (Q / 4 a perfect square).
        dim: D, the RAA width.
        heads: RAA attention heads.
        img_size: the training input side (default: the models' declared ``img_size``); the
            modules are sized by one forward of each model at construction.
        compat: None or ``"authors"`` (above).
        impl: backend of ``ops.raa_attention``.

    Raises:
        ValueError: roles other than one teacher and one student, a teacher family without prompt
            sites, no input size, an unknown ``compat``, or shapes RAA cannot take.
    """

    soft_targets = True

    def __init__(self, roles, num_classes, models: Sequence[nn.Module], *, ce_weight=1.0, kd_weight=1.0,
                 mse_weight=1.0, reg_weight=1.0, temperature=1.0, label_smoothing=0.1, num_queries=64, dim=512,
                 heads=8, img_size: Optional[int] = None, compat: Optional[str] = None, impl: Optional[str] = None):
        super().__init__(roles, num_classes)
        if compat not in COMPAT_MODES:
            raise ValueError(f"pat compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.compat = compat == "authors"
        self.teacher = teachers_of(self.roles)[0]
        self.student = students_of(self.roles)[0]
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.mse_weight, self.reg_weight = float(mse_weight), float(reg_weight)
        self.temperature, self.label_smoothing = float(temperature), float(label_smoothing)
        teacher, student = models[self.teacher], models[self.student]
        if not supports_prompts(teacher):
            raise ValueError(f"pat: the teacher ({type(teacher).__name__}) has no prompt sites; teachers can be "
                             "ResNet, ConvNeXt, ViT/DeiT, Swin, MLP-Mixer or ResMLP models")
        teacher.requires_grad_(False)
        self.img_size = input_size(img_size, models, "pat")
        self.student_prefix = int(getattr(student, "num_prefix_tokens", 0))
        self.teacher_prefix = int(getattr(teacher, "num_prefix_tokens", 0))

        s_shapes = [tuple(f.shape[1:]) for f in self._student_maps(probe(student, self.img_size))]
        sites: list[tuple[int, ...]] = []

        def record(i, h):
            sites.append(tuple(h.shape[1:]))
            return h

        t_shapes = [tuple(f.shape[1:]) for f in
                    self._teacher_features(probe(teacher, self.img_size, lambda m, x: staged_forward(m, x, record)))]
        if len(sites) != NUM_SITES:  # pragma: no cover - every family has four sites
            raise ValueError(f"pat: the teacher has {len(sites)} prompt sites, expected {NUM_SITES}")

        self.raa = RegionAwareAttention([_map_shape(s, "student stage") for s in s_shapes], num_queries, dim, heads,
                                        batch_encoding=self.compat, impl=impl)
        q = self.raa.per_stage
        aligners = []
        for shape in t_shapes:
            if len(shape) == 3:
                aligners.append(TokensToMap(dim, shape[0], _map_shape(shape, "teacher stage")[1]))
            else:
                aligners.append(TokensToTokens(q, dim, shape[0], shape[1]))
        self.aligners = nn.ModuleList(aligners)
        init_projector(self.aligners)
        self.prompts = nn.ModuleList(PromptBlock(site, fb, self.teacher_prefix, self.compat)
                                     for site, fb in zip(sites, t_shapes))
        self.feedback_shapes = t_shapes
        for i, shape in enumerate(t_shapes):
            self.register_buffer(f"feedback_{i}", torch.zeros(0, *shape))
        self.register_buffer("has_feedback", torch.zeros(()))
        self._feedback_ready = False  # host mirror of has_feedback: the first step has no fusion branch
        self._first_batch = False  # compat: the epoch's first batch runs the clean teacher in train mode

    @classmethod
    def check_roles(cls, roles, name=None):
        roles = super().check_roles(roles, name)
        if len(teachers_of(roles)) != 1 or len(students_of(roles)) != 1:
            raise ValueError(f"{name or cls.__name__}: needs exactly one (frozen) teacher and one student, "
                             f"got roles {roles}")
        return roles

    @classmethod
    def trainable_of(cls, roles):
        return tuple(r != "teacher" for r in roles)

    # ---------------------------------------------------------------- features

    def _student_maps(self, output) -> list[torch.Tensor]:
        feats = stage_features(output)
        return [as_map(drop_class_tokens(f, self.student_prefix, last=self.compat)) for f in feats]

    def _teacher_features(self, output) -> list[torch.Tensor]:
        return [drop_class_tokens(f, self.teacher_prefix, last=self.compat) for f in stage_features(output)]

    # ---------------------------------------------------------------- feedback buffers

    def _feedback(self, i: int, batch: int) -> torch.Tensor:
        """The first ``batch`` rows of stage i's feedback buffer (grown with zero rows if needed)."""
        buf = getattr(self, f"feedback_{i}")
        if buf.shape[0] < batch:
            grown = buf.new_zeros((batch, *buf.shape[1:]))
            grown[: buf.shape[0]] = buf
            setattr(self, f"feedback_{i}", grown)
            buf = grown
        return buf[:batch]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the buffers hold one row per sample of the batch they were filled with: take the saved size
        for i in range(len(self.feedback_shapes)):
            key = f"{prefix}feedback_{i}"
            if key in state_dict:
                old = getattr(self, f"feedback_{i}")
                setattr(self, f"feedback_{i}", old.new_zeros(state_dict[key].shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._feedback_ready = bool(self.has_feedback.item())

    # ---------------------------------------------------------------- schedule

    def start_epoch(self, epoch: int, epochs: int) -> None:
        super().start_epoch(epoch, epochs)
        self._first_batch = self.compat

    # ---------------------------------------------------------------- forward

    def forward(self, outputs, target, indices=None):
        raise TypeError("PAT runs the teacher itself (a clean and a prompted forward): call "
                        "forward_batch(models, images, target)")

    def prompted_teacher(self, teacher: nn.Module, images: torch.Tensor):
        """The teacher's forward with the prompt blocks at its stage inputs, fed with the previous
        step's feedback (none before the first step). Gradients flow through the frozen teacher
        into the prompts."""
        b = images.shape[0]
        # a copy: this step overwrites the buffers before its backward, which may need the values read
        feedback = [self._feedback(i, b).clone() if self._feedback_ready else None for i in range(len(self.prompts))]
        return staged_forward(teacher, images, lambda i, h: self.prompts[i](h, feedback[i]))

    def forward_batch(self, models, images, target, indices=None):
        """Student forward, clean and prompted teacher forwards, the PAT loss; stores the feedback.

        Args:
            models: the models in the order of ``roles`` (the student possibly DDP-wrapped).
            images: [B, 3, img_size, img_size].
            target: labels [B], or soft targets [B, num_classes].
            indices: unused.

        Returns:
            ``(outputs, losses)``; ``outputs`` holds the student's and the *clean* teacher's output.

        Raises:
            ValueError: images of another size than the method was built for, or a target of the
                wrong shape.
        """
        if images.shape[-1] != self.img_size or images.shape[-2] != self.img_size:
            raise ValueError(f"PAT was built for {self.img_size}-px inputs (method.options.pat.img_size or the "
                             f"models' img_size), got images {tuple(images.shape)}")
        teacher, student = models[self.teacher], models[self.student]
        if teacher.training != self._first_batch:
            teacher.train(self._first_batch)
        with torch.no_grad():
            out_t = teacher(images)
        if self._first_batch:
            teacher.eval()
            self._first_batch = False
        out_s = student(images)
        out_p = self.prompted_teacher(teacher, images)
        outputs = [out_t, out_s] if self.teacher == 0 else [out_s, out_t]
        self._check(outputs, target, indices)

        s, t = self.student, self.teacher
        aligned = [align(r) for align, r in zip(self.aligners, self.raa(self._student_maps(out_s)))]
        targets = self._teacher_features(out_p)
        z_s, z_t = out_s.logits, out_t.logits
        terms = {
            f"ce/{s}": self.ce_weight * target_ce(z_s, target, self.label_smoothing),
            f"kl/{s}": self.kd_weight * kd_kl(z_s, soft_probs(z_t, self.temperature), self.temperature),
            f"hint/{s}": self.mse_weight * hcl_loss(aligned, targets),
            f"reg/{t}": self.reg_weight * kd_kl(out_p.logits, soft_probs(z_t, 1.0), 1.0),
        }
        with torch.no_grad():
            b = images.shape[0]
            for i, (a, f) in enumerate(zip(aligned, targets)):
                self._feedback(i, b).copy_(a - f)
            self.has_feedback.fill_(1.0)
        self._feedback_ready = True
        return outputs, self.loss_output(terms)
