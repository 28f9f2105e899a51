"""timm's state-dict layouts (timm >= 0.9 names) for the timm-layout models, derived from the
architectures' definitions (huggingface/pytorch-image-models: vision_transformer.py, deit.py,
swin_transformer.py, mlp_mixer.py, convnext.py, efficientnet.py + _efficientnet_blocks.py,
resnet.py) independently of kdengine's code.

Each function returns ``{key: shape}`` of ``model.state_dict()``, BN buffers included
(non-persistent buffers, such as Swin's ``relative_position_index``, are not in a state dict).
``parameter_count`` of a layout must equal timm's published count (``TIMM_COUNTS``), which the
tests check, so a slip in a derivation cannot pass unnoticed.
"""
from __future__ import annotations

Shapes = dict[str, tuple[int, ...]]

# timm's parameter counts at 1000 classes (its model cards / ``sum(p.numel())``); Swin-P/N are
# OFA-KD's ``SwinTransformer(embed_dim=48 / 64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))``.
TIMM_COUNTS = {
    "deit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_pico_patch4_window7_224": 5_506_996,
    "swin_nano_patch4_window7_224": 9_599_940,
    "mixer_b16_224": 59_880_472,
    "convnext_tiny": 28_589_128,
    "resmlp_12_224": 15_350_872,
    "mobilenetv2_100": 3_504_872,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
}
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def parameter_count(shapes: Shapes) -> int:
    total = 0
    for key, shape in shapes.items():
        if not key.endswith(_BUFFERS):
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


def _norm(prefix: str, c: int) -> Shapes:  # LayerNorm
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _linear(prefix: str, cin: int, cout: int, bias: bool = True) -> Shapes:
    s = {f"{prefix}.weight": (cout, cin)}
    if bias:
        s[f"{prefix}.bias"] = (cout,)
    return s


def _bn(prefix: str, c: int) -> Shapes:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _mlp(prefix: str, dim: int, hidden: int) -> Shapes:  # timm.layers.Mlp: fc1, fc2
    return {**_linear(f"{prefix}.fc1", dim, hidden), **_linear(f"{prefix}.fc2", hidden, dim)}


def vit(dim: int, depth: int = 12, patch: int = 16, img: int = 224, num_classes: int = 1000) -> Shapes:
    # VisionTransformer(global_pool='token', class_token=True, qkv_bias=True, mlp_ratio=4,
    # init_values=None -> ls1/ls2 Identity, qk_norm off -> q_norm/k_norm Identity, fc_norm Identity)
    tokens = (img // patch) ** 2 + 1
    s: Shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim),
                 "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.{i}"
        s.update(_norm(f"{p}.norm1", dim))
        s.update(_linear(f"{p}.attn.qkv", dim, 3 * dim))
        s.update(_linear(f"{p}.attn.proj", dim, dim))
        s.update(_norm(f"{p}.norm2", dim))
        s.update(_mlp(f"{p}.mlp", dim, 4 * dim))
    s.update(_norm("norm", dim))
    s.update(_linear("head", dim, num_classes))
    return s


def swin(dim: int, depths: tuple[int, ...], heads: tuple[int, ...], img: int = 224, patch: int = 4, window: int = 7,
         num_classes: int = 1000) -> Shapes:
    # SwinTransformer (timm >= 0.9): PatchMerging at the start of stages 1-3 (layers.i.downsample),
    # head = ClassifierHead (head.fc); a stage's window is min(window, its resolution)
    s: Shapes = {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
                 **_norm("patch_embed.norm", dim)}
    res = img // patch
    d = dim
    for i, (depth, h) in enumerate(zip(depths, heads)):
        if i > 0:
            s.update(_norm(f"layers.{i}.downsample.norm", 4 * d))
            s.update(_linear(f"layers.{i}.downsample.reduction", 4 * d, 2 * d, bias=False))
            d, res = 2 * d, res // 2
        w = min(window, res)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            s.update(_norm(f"{p}.norm1", d))
            s[f"{p}.attn.relative_position_bias_table"] = ((2 * w - 1) ** 2, h)
            s.update(_linear(f"{p}.attn.qkv", d, 3 * d))
            s.update(_linear(f"{p}.attn.proj", d, d))
            s.update(_norm(f"{p}.norm2", d))
            s.update(_mlp(f"{p}.mlp", d, 4 * d))
    s.update(_norm("norm", d))
    s.update(_linear("head.fc", d, num_classes))
    return s


def mixer(dim: int = 768, depth: int = 12, patch: int = 16, img: int = 224, num_classes: int = 1000) -> Shapes:
    # MlpMixer with MixerBlock, mlp_ratio=(0.5, 4.0): token MLP L -> dim/2 -> L, channel MLP 4x
    tokens = (img // patch) ** 2
    s: Shapes = {"stem.proj.weight": (dim, 3, patch, patch), "stem.proj.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.{i}"
        s.update(_norm(f"{p}.norm1", dim))
        s.update(_linear(f"{p}.mlp_tokens.fc1", tokens, dim // 2))
        s.update(_linear(f"{p}.mlp_tokens.fc2", dim // 2, tokens))
        s.update(_norm(f"{p}.norm2", dim))
        s.update(_mlp(f"{p}.mlp_channels", dim, 4 * dim))
    s.update(_norm("norm", dim))
    s.update(_linear("head", dim, num_classes))
    return s


def resmlp(dim: int = 384, depth: int = 12, patch: int = 16, img: int = 224, num_classes: int = 1000) -> Shapes:
    # MlpMixer with ResBlock and Affine norms (alpha/beta of shape [1, 1, dim]), layer scales ls1/ls2
    tokens = (img // patch) ** 2

    def affine(prefix: str) -> Shapes:
        return {f"{prefix}.alpha": (1, 1, dim), f"{prefix}.beta": (1, 1, dim)}

    s: Shapes = {"stem.proj.weight": (dim, 3, patch, patch), "stem.proj.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.{i}"
        s.update(affine(f"{p}.norm1"))
        s.update(_linear(f"{p}.linear_tokens", tokens, tokens))
        s.update(affine(f"{p}.norm2"))
        s.update(_mlp(f"{p}.mlp_channels", dim, 4 * dim))
        s[f"{p}.ls1"] = (dim,)
        s[f"{p}.ls2"] = (dim,)
    s.update(affine("norm"))
    s.update(_linear("head", dim, num_classes))
    return s


def convnext(depths: tuple[int, ...] = (3, 3, 9, 3), dims: tuple[int, ...] = (96, 192, 384, 768),
             num_classes: int = 1000) -> Shapes:
    # ConvNeXt(stem_type='patch', conv_mlp=False, ls_init_value=1e-6, head_norm_first=False ->
    # NormMlpClassifierHead without hidden layer: head.norm, head.fc)
    s: Shapes = {"stem.0.weight": (dims[0], 3, 4, 4), "stem.0.bias": (dims[0],), **_norm("stem.1", dims[0])}
    for i, (depth, d) in enumerate(zip(depths, dims)):
        if i > 0:
            s.update(_norm(f"stages.{i}.downsample.0", dims[i - 1]))
            s[f"stages.{i}.downsample.1.weight"] = (d, dims[i - 1], 2, 2)
            s[f"stages.{i}.downsample.1.bias"] = (d,)
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}"
            s[f"{p}.gamma"] = (d,)
            s[f"{p}.conv_dw.weight"] = (d, 1, 7, 7)
            s[f"{p}.conv_dw.bias"] = (d,)
            s.update(_norm(f"{p}.norm", d))
            s.update(_mlp(f"{p}.mlp", d, 4 * d))
    s.update(_norm("head.norm", dims[-1]))
    s.update(_linear("head.fc", dims[-1], num_classes))
    return s


def mobilenetv2_100(num_classes: int = 1000) -> Shapes:
    # _gen_mobilenet_v2 arch_def: ds_r1_k3_s1_c16, ir_r2_k3_s2_e6_c24, ir_r3_k3_s2_e6_c32,
    # ir_r4_k3_s2_e6_c64, ir_r3_k3_s1_e6_c96, ir_r3_k3_s2_e6_c160, ir_r1_k3_s1_e6_c320; stem 32, head 1280
    s: Shapes = {"conv_stem.weight": (32, 3, 3, 3), **_bn("bn1", 32)}
    s["blocks.0.0.conv_dw.weight"] = (32, 1, 3, 3)
    s.update(_bn("blocks.0.0.bn1", 32))
    s["blocks.0.0.conv_pw.weight"] = (16, 32, 1, 1)
    s.update(_bn("blocks.0.0.bn2", 16))
    cin = 16
    for stage, (c, n) in enumerate(((24, 2), (32, 3), (64, 4), (96, 3), (160, 3), (320, 1)), 1):
        for b in range(n):
            p, mid = f"blocks.{stage}.{b}", 6 * cin
            s[f"{p}.conv_pw.weight"] = (mid, cin, 1, 1)
            s.update(_bn(f"{p}.bn1", mid))
            s[f"{p}.conv_dw.weight"] = (mid, 1, 3, 3)
            s.update(_bn(f"{p}.bn2", mid))
            s[f"{p}.conv_pwl.weight"] = (c, mid, 1, 1)
            s.update(_bn(f"{p}.bn3", c))
            cin = c
    s["conv_head.weight"] = (1280, 320, 1, 1)
    s.update(_bn("bn2", 1280))
    s.update(_linear("classifier", 1280, num_classes))
    return s


def resnet(bottleneck: bool, depths: tuple[int, ...], num_classes: int = 1000) -> Shapes:
    # timm's ResNet (default stem, no attention): conv1/bn1, layerN.i.conv1..conv{2,3}/bn..,
    # downsample = Sequential(conv1x1, BN) where stride != 1 or the width changes, fc
    e = 4 if bottleneck else 1
    s: Shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), depths), 1):
        for j in range(n):
            p = f"layer{i}.{j}"
            stride = 2 if i > 1 and j == 0 else 1
            if bottleneck:
                convs = [(planes, cin, 1), (planes, planes, 3), (planes * e, planes, 1)]
            else:
                convs = [(planes, cin, 3), (planes, planes, 3)]
            for k, (co, ci, ks) in enumerate(convs, 1):
                s[f"{p}.conv{k}.weight"] = (co, ci, ks, ks)
                s.update(_bn(f"{p}.bn{k}", co))
            if stride != 1 or cin != planes * e:
                s[f"{p}.downsample.0.weight"] = (planes * e, cin, 1, 1)
                s.update(_bn(f"{p}.downsample.1", planes * e))
            cin = planes * e
    s.update(_linear("fc", 512 * e, num_classes))
    return s


LAYOUTS = {
    "deit_tiny_patch16_224": lambda: vit(192),
    "vit_small_patch16_224": lambda: vit(384),
    "swin_tiny_patch4_window7_224": lambda: swin(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_pico_patch4_window7_224": lambda: swin(48, (2, 2, 2, 2), (2, 4, 8, 16)),
    "swin_nano_patch4_window7_224": lambda: swin(64, (2, 2, 2, 2), (2, 4, 8, 16)),
    "mixer_b16_224": mixer,
    "convnext_tiny": convnext,
    "resmlp_12_224": resmlp,
    "mobilenetv2_100": mobilenetv2_100,
    "resnet18": lambda: resnet(False, (2, 2, 2, 2)),
    "resnet50": lambda: resnet(True, (3, 4, 6, 3)),
}
