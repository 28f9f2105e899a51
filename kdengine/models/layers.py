"""Building blocks shared by the transformer, MLP and ConvNeXt models (timm-layout families).

Module and parameter names follow timm's (``fc1``/``fc2``, ``qkv``/``proj``, ``proj``/``norm`` of
the patch embedding, ``fc``/``norm`` of a pooled head), so that a model assembled from these
blocks has timm's state-dict keys. Dropout layers that timm keeps at rate 0 in every model here
are left out: they hold no state and do nothing.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import KDModel


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
    """Stochastic-depth rate of each block: linear from 0 (first block) to ``rate`` (last block).

    Computed on the CPU in float32 as timm does, so the rates are bit-equal to timm's and the
    function works while a model is being built on the ``meta`` device.
    """
    return torch.linspace(0.0, rate, num_blocks, device="cpu").tolist()


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of the samples and
    scale the kept ones by ``1 / (1 - p)``; the identity in eval mode or at ``p = 0``.

    The per-sample draw happens on the input's device (no host synchronisation, CUDA-graph safe).

    Args:
        p: probability of dropping the branch of a sample.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class Mlp(nn.Module):
    """Two linear layers with an activation between them (``fc1`` -> act -> ``fc2``).

    Args:
        dim: input and output width.
        hidden: width of the hidden layer.
        act: activation module class (GELU, the exact erf form, as timm).
    """

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over a token sequence: ``qkv`` projection, scaled dot product,
    ``proj`` back to the width.

    Args:
        dim: token width (divisible by ``num_heads``).
        num_heads: attention heads.
        qkv_bias: bias on the ``qkv`` projection (timm's ViTs have one).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a ``proj`` conv with kernel = stride = ``patch_size``,
    optionally followed by a LayerNorm ``norm`` over the channels.

    Args:
        img_size: side of the (square) input image the model is built for; the input must have it
            (position embeddings, token-mixing weights and Swin's windows are sized from it).
        patch_size: side of a patch (must divide ``img_size``).
        dim: token width.
        norm: add the LayerNorm (Swin's patch embedding has one, ViT's and Mixer's do not).
        in_chans: input channels.

    Returns (forward):
        The tokens as a grid, [B, H/p, W/p, dim] (channels last; ``flatten(1, 2)`` gives [B, L, dim]).
    """

    def __init__(self, img_size: int, patch_size: int, dim: int, norm: bool = False, in_chans: int = 3):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])} but the model was built for img_size={self.img_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PooledHead(nn.Module):
    """Classifier applied to a pooled feature [B, C]: an optional LayerNorm ``norm``, then ``fc``.

    timm wraps the classifier of Swin and ConvNeXt in a head module (keys ``head.fc.*``, and
    ``head.norm.*`` for ConvNeXt); this module has the same names but takes the pooled vector, so it
    is what ``KDModel.head`` promises (pooling is the model's ``pre_logits``).

    Args:
        dim: pooled width.
        num_classes: logits.
        norm: LayerNorm (eps 1e-6, as ConvNeXt's) before ``fc``.
    """

    def __init__(self, dim: int, num_classes: int, norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """timm's transformer initialisation of one module: Linear weights from N(0, std) cut at
    +-2 (absolute, i.e. effectively uncut for small std), zero biases; LayerNorms 1 / 0. Other
    modules (the patch conv) keep PyTorch's default. Apply with ``model.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def lecun_normal_(weight: torch.Tensor) -> None:
    """LeCun normal as in JAX/Flax: truncated normal at +-2 std with variance 1 / fan_in (the
    0.8796 factor is the std of a standard normal cut at +-2, so the variance comes out exact)."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class TimmLayoutModel(KDModel):
    """Base of the models whose classifier is a submodule named ``head`` (timm's key names), with
    the shape bookkeeping PAT/OFA use.

    Subclasses set ``stage_channels``, ``stage_shapes`` (per-sample shape of each entry of
    ``features`` at ``img_size``), ``feature_format`` ("tokens": [B, L, C]; "nchw": [B, C, H, W]),
    ``num_prefix_tokens`` (tokens before the patch tokens, e.g. ViT's class token) and implement
    ``pre_logits``. Their ``ModelOutput.hints`` are the features themselves (no ReLU follows them
    in these networks, so FitNet regresses the raw stage outputs, as OFA-KD does).
    """

    feature_format: str = "tokens"
    num_prefix_tokens: int = 0
    stage_shapes: tuple[tuple[int, ...], ...]
    img_size: int

    @property
    def head(self) -> nn.Module:
        # the submodule registered as ``head`` (this property hides nn.Module's attribute lookup)
        return self._modules["head"]

    def pre_logits(self, last: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every model overrides
        """Map the last entry of ``features`` to the input of ``head`` (so that, with dropout off,
        ``logits == head(pre_logits(features[-1]))``)."""
        raise NotImplementedError

    def remap_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the keys of a state dict saved in another known layout of this architecture
        (an official release, an older timm) to this model's names; a state dict already in
        timm's current layout comes back unchanged. Call it before a strict ``load_state_dict``.

        Args:
            state: parameter name -> tensor.

        Returns:
            A new dict (this base has no other layout: the same items).
        """
        return dict(state)
