"""The timm-layout models (ViT/DeiT, Swin, Mixer, ResMLP, ConvNeXt, timm's MobileNetV2): timm's
state-dict names and parameter counts, the features PAT/OFA tap, small inputs, stochastic depth,
strict reloading, the key remaps of the official releases, and timm itself as an optional oracle.

Forward tests run at 32 px with 10 classes (the CIFAR / embedded-set case, and fast on a CPU);
layouts and counts are checked at 224 px / 1000 classes on the ``meta`` device (no forward).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from kdengine.models import count_parameters, create_model
from kdengine.models.convnext import remap_official_keys as convnext_remap
from kdengine.models.layers import DropPath, drop_path_rates
from kdengine.models.resmlp import remap_official_keys as resmlp_remap
from kdengine.models.swin import relative_position_index, remap_legacy_keys, shifted_window_mask

from .timm_layouts import LAYOUTS, TIMM_COUNTS, parameter_count

NAMES = ["deit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224",
         "swin_pico_patch4_window7_224", "swin_nano_patch4_window7_224", "mixer_b16_224", "convnext_tiny",
         "resmlp_12_224", "mobilenetv2_100"]
TOKEN_MODELS = [n for n in NAMES if not n.startswith(("convnext", "mobilenet"))]
SIZE, CLASSES = 32, 10


def _model(name: str, **kwargs):
    return create_model(name, num_classes=CLASSES, img_size=SIZE, **kwargs)


def _meta(name: str, **kwargs):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return create_model(name, num_classes=1000, **kwargs)


def _layout(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _randomize(model, seed: int = 1) -> None:
    """Every parameter and BN statistic drawn at random, so no test passes on an initial value
    (Mixer's zero head, ResMLP's 1e-4 layer scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name else
                        torch.randn(t.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- layouts and parameter counts


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_derived_layouts_sum_to_timm_counts(name):
    assert parameter_count(LAYOUTS[name]()) == TIMM_COUNTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_timms_layout(name):
    model = _meta(name)
    expected = LAYOUTS[name]()
    got = _layout(model)
    assert got.keys() == expected.keys(), (sorted(got.keys() - expected.keys()), sorted(expected.keys() - got.keys()))
    assert got == expected
    assert count_parameters(model) == TIMM_COUNTS[name]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnets_are_the_torchvision_layout(name):
    # timm's resnet18/50 have torchvision's names and shapes: the existing models serve both
    assert _layout(_meta(name)) == LAYOUTS[name]()


def test_stage_shapes_at_224_are_pats():
    # PAT's stage features (token count x width, or C x H x W) at 224 px
    shapes = {n: _meta(n).stage_shapes for n in NAMES}
    assert shapes["deit_tiny_patch16_224"] == ((197, 192),) * 4
    assert shapes["vit_small_patch16_224"] == ((197, 384),) * 4
    assert shapes["swin_tiny_patch4_window7_224"] == ((3136, 96), (784, 192), (196, 384), (49, 768))
    assert shapes["swin_pico_patch4_window7_224"] == ((3136, 48), (784, 96), (196, 192), (49, 384))
    assert shapes["swin_nano_patch4_window7_224"] == ((3136, 64), (784, 128), (196, 256), (49, 512))
    assert shapes["mixer_b16_224"] == ((196, 768),) * 4
    assert shapes["resmlp_12_224"] == ((196, 384),) * 4
    assert shapes["convnext_tiny"] == ((96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7))
    assert shapes["mobilenetv2_100"] == ((32, 112, 112), (24, 56, 56), (32, 28, 28), (96, 14, 14), (1280, 7, 7))


# ---------------------------------------------------------------- the forward contract


@pytest.mark.parametrize("name", NAMES)
def test_forward_features_head_backward(name):
    model = _model(name, drop_path_rate=0.0)
    _randomize(model)
    model.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert out.logits.shape == (2, CLASSES)
    assert len(out.features) == len(model.stage_channels) == len(model.stage_shapes)
    for f, c, shape in zip(out.features, model.stage_channels, model.stage_shapes):
        assert tuple(f.shape) == (2, *shape)
        assert (f.shape[-1] if model.feature_format == "tokens" else f.shape[1]) == c
    assert model.feature_format == ("tokens" if name in TOKEN_MODELS else "nchw")
    if name in TOKEN_MODELS:
        assert model.num_prefix_tokens == (1 if "patch16" in name else 0)  # ViT's class token
    assert [h.shape for h in out.hints] == [f.shape for f in out.features]
    torch.testing.assert_close(model.head(model.pre_logits(out.features[-1])), out.logits)
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1])) + sum(f.square().mean() for f in out.features)
    loss.backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model.head(model.pre_logits(out.features[-1])), out.logits)


def test_vit_tokens_keep_the_class_token_first():
    model = _model("deit_tiny_patch16_224").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, SIZE, SIZE))
        # the logits come from the final norm of token 0 of the last block's output
        torch.testing.assert_close(model.head(model.norm(out.features[-1])[:, 0]), out.logits)
    assert out.features[0].shape == (2, 1 + (SIZE // 16) ** 2, 192)


def test_mobilenetv2_100_last_feature_carries_relu6():
    model = _model("mobilenetv2_100").eval()
    with torch.no_grad():
        model.bn2.weight.fill_(10.0)  # batch-normalised, then scaled: many values > 6
        out = model(torch.randn(2, 3, SIZE, SIZE))
    assert F.relu(out.features[-1]).max() == 6.0
    torch.testing.assert_close(out.hints[-1], F.relu(out.features[-1]))
    torch.testing.assert_close(model.head(F.relu(out.features[-1]).mean(dim=(2, 3))), out.logits)


def test_input_of_another_size_is_refused():
    model = _model("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match="img_size=32"):
        model(torch.randn(1, 3, 48, 48))


# ---------------------------------------------------------------- Swin at small sizes


def test_swin_window_clamps_to_small_maps():
    model = _model("swin_tiny_patch4_window7_224")
    blocks = [stage.blocks for stage in model.layers]
    # maps of 8, 4, 2, 1 tokens a side: stage 1 keeps window 7 (8 > 7, padded to 14), the others
    # shrink the window to the map and drop the shift
    assert [b[0].window for b in blocks] == [7, 4, 2, 1]
    assert [b[1].shift for b in blocks] == [3, 0, 0, 0]
    assert all(b[0].shift == 0 for b in blocks)
    assert [b[0].attn.relative_position_bias_table.shape for b in blocks] == [
        (169, 3), (49, 6), (9, 12), (1, 24)]
    assert blocks[0][1].attn_mask.shape == (4, 49, 49)  # (14 / 7)^2 windows on the padded map
    assert blocks[1][1].attn_mask is None
    assert model.stage_shapes == ((64, 96), (16, 192), (4, 384), (1, 768))


def test_shifted_window_mask_separates_wrapped_regions():
    res, w, s = 8, 4, 2
    mask = shifted_window_mask(res, w, s)
    assert mask.shape == ((res // w) ** 2, w * w, w * w)
    # region of each position of the rolled map, from the slice definition of the shift
    region = torch.zeros(res, res, dtype=torch.long)
    cuts = (slice(0, -w), slice(-w, -s), slice(-s, None))
    for i, hs in enumerate(cuts):
        for j, ws in enumerate(cuts):
            region[hs, ws] = 3 * i + j
    windows = region.view(2, w, 2, w).permute(0, 2, 1, 3).reshape(4, w * w)
    expected = torch.where(windows[:, :, None] == windows[:, None, :], 0.0, -100.0)
    torch.testing.assert_close(mask, expected)
    assert not mask[0].any()  # the top-left window holds no wrapped tokens


def test_relative_position_index_counts_offsets():
    w = 3
    idx = relative_position_index(w)
    assert idx.shape == (9, 9) and idx.min() == 0 and idx.max() == (2 * w - 1) ** 2 - 1
    assert (idx.diagonal() == (w - 1) * (2 * w - 1) + (w - 1)).all()  # zero offset: the table's centre
    # query (0, 0), key (2, 1): offset (-2, -1) -> row (0, 1) of the 5 x 5 table
    assert idx[0, 2 * w + 1] == 0 * (2 * w - 1) + 1


# ---------------------------------------------------------------- stochastic depth


def test_drop_path_zeroes_whole_samples_and_rescales():
    layer = DropPath(0.5).train()
    y = layer(torch.ones(4000, 3, 2))
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0.45 < (per_sample[:, 0] == 0).float().mean() < 0.55
    x = torch.randn(5, 7)
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


@pytest.mark.parametrize("name, rates", [
    ("deit_tiny_patch16_224", lambda m: [b.drop_path.p for b in m.blocks]),
    ("swin_pico_patch4_window7_224", lambda m: [b.drop_path.p for s in m.layers for b in s.blocks]),
    ("convnext_tiny", lambda m: [b.drop_path.p for s in m.stages for b in s.blocks]),
])
def test_drop_path_rate_grows_linearly_over_blocks(name, rates):
    got = rates(_meta(name, drop_path_rate=0.3))
    torch.testing.assert_close(torch.tensor(got), torch.linspace(0, 0.3, len(got)))


def test_drop_path_rate_of_mixers_and_mobilenet_follow_timm():
    assert {b.drop_path.p for b in _meta("mixer_b16_224", drop_path_rate=0.2).blocks} == {0.2}  # constant
    assert {b.drop_path.p for b in _meta("resmlp_12_224", drop_path_rate=0.2).blocks} == {0.2}
    blocks = [b for s in _meta("mobilenetv2_100", drop_path_rate=0.17).blocks for b in s]
    assert [round(b.drop_path.p, 6) for b in blocks] == [round(0.17 * k / 17, 6) for k in range(17)]
    assert _meta("swin_tiny_patch4_window7_224").layers[3].blocks[1].drop_path.p == pytest.approx(0.1)  # timm default
    assert drop_path_rates(0.1, 1) == [0.0]


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_pico_patch4_window7_224", "convnext_tiny"])
def test_drop_path_active_in_train_mode_only(name):
    model = _model(name, drop_path_rate=0.5)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = model(x).logits, model(x).logits
        assert not torch.allclose(a, b)
        model.eval()
        torch.testing.assert_close(model(x).logits, model(x).logits)


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_file_reloads_strictly(name, tmp_path):
    model = _model(name)
    _randomize(model)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    torch.manual_seed(5)
    fresh = _model(name)
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    fresh.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", TOKEN_MODELS + ["convnext_tiny"])
def test_remap_keeps_a_current_layout_state_dict(name):
    state = _meta(name).state_dict()
    remapped = _meta(name).remap_state_dict(state)
    assert remapped.keys() == state.keys() and all(remapped[k] is state[k] for k in state)


def test_swin_legacy_layout_remaps():
    # Microsoft's release / timm <= 0.8: patch merging at the end of stages 0-2, ``head``, and
    # the index / mask buffers saved
    model = _model("swin_pico_patch4_window7_224")
    _randomize(model)
    legacy = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^layers\.(\d)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        legacy[k.replace("head.fc.", "head.")] = v
    legacy["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    legacy["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    assert "layers.2.downsample.reduction.weight" in legacy and "head.weight" in legacy
    fresh = _model("swin_pico_patch4_window7_224")
    fresh.load_state_dict(fresh.remap_state_dict(legacy), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert remap_legacy_keys(model.state_dict()).keys() == model.state_dict().keys()


def test_convnext_official_layout_remaps():
    # facebookresearch/ConvNeXt names, written from its model definition
    own = _meta("convnext_tiny").state_dict()
    official = {}
    for k in own:
        o = re.sub(r"^stem\.", "downsample_layers.0.", k)
        o = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", o)
        o = re.sub(r"^stages\.(\d)\.blocks\.(\d)\.", r"stages.\1.\2.", o)
        o = o.replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1").replace("mlp.fc2", "pwconv2")
        o = o.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        official[o] = k
    assert {"downsample_layers.0.0.weight", "downsample_layers.3.1.bias", "stages.2.8.pwconv1.weight",
            "stages.0.0.gamma", "norm.weight", "head.weight"} <= official.keys()
    assert convnext_remap(official) == {k: k for k in own}
    assert convnext_remap(dict(own)).keys() == own.keys()


def test_resmlp_official_layout_remaps():
    own = _meta("resmlp_12_224").state_dict()
    official = {}
    for k, v in own.items():
        o = k.replace("stem.", "patch_embed.").replace("linear_tokens.", "attn.").replace("mlp_channels.", "mlp.")
        o = re.sub(r"\.ls(\d)$", r".gamma_\1", o)
        official[o] = v.reshape(-1) if k.endswith((".alpha", ".beta")) else v
    remapped = resmlp_remap(official)
    assert {k: tuple(v.shape) for k, v in remapped.items()} == {k: tuple(v.shape) for k, v in own.items()}


# ---------------------------------------------------------------- channels_last and compile


@pytest.mark.parametrize("name", ["convnext_tiny", "mobilenetv2_100", "deit_tiny_patch16_224"])
def test_channels_last_equals_contiguous(name):
    model = _model(name).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for g, r in zip(got.features, ref.features):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_pico_patch4_window7_224"])
def test_forward_compiles_without_graph_breaks(name):
    # fullgraph=True fails on any graph break; the "eager" backend stops after Dynamo's capture
    model = _model(name).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    got = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got.logits, model(x).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- timm as an oracle (optional)


def _timm_model(name: str):
    timm = pytest.importorskip("timm")
    if name in ("swin_pico_patch4_window7_224", "swin_nano_patch4_window7_224"):
        from timm.models.swin_transformer import SwinTransformer

        dim = 48 if "pico" in name else 64
        return SwinTransformer(img_size=SIZE, embed_dim=dim, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16),
                               num_classes=CLASSES)
    kwargs = {} if name in ("convnext_tiny", "mobilenetv2_100") else {"img_size": SIZE}
    return timm.create_model(name, num_classes=CLASSES, **kwargs)


def _timm_taps(name: str, ref) -> list:
    if name in ("swin_tiny_patch4_window7_224", "swin_pico_patch4_window7_224", "swin_nano_patch4_window7_224"):
        return list(ref.layers)
    if name == "convnext_tiny":
        return list(ref.stages)
    if name == "mobilenetv2_100":
        flat = [b for s in ref.blocks for b in s]
        return [ref.bn1, *(flat[i] for i in (2, 5, 12)), ref.bn2]
    return [ref.blocks[i] for i in (1, 3, 9, 11)]


@pytest.mark.parametrize("name", NAMES)
def test_same_weights_same_outputs_as_timm(name):
    ref = _timm_model(name).eval()
    model = _model(name).eval()
    _randomize(model)
    ref.load_state_dict(model.state_dict(), strict=True)
    taps = []
    for m in _timm_taps(name, ref):
        m.register_forward_hook(lambda mod, inp, out: taps.append(out))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(x)
        logits = ref(x)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    if name == "mobilenetv2_100":  # timm's BN modules apply ReLU6 themselves: compare relu6 of ours
        ours = [F.relu(out.features[0]), *out.features[1:4], F.relu(out.features[4])]
    elif name.startswith("swin"):  # timm's stages return NHWC maps
        ours = out.features
        taps = [t.flatten(1, 2) for t in taps]
    else:
        ours = out.features
    for o, t in zip(ours, taps, strict=True):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    # aot_eager traces the backward too (what inductor would see); about 10 s on 2 CPU cores
    model = _model("swin_pico_patch4_window7_224", drop_path_rate=0.0)
    x = torch.randn(2, 3, SIZE, SIZE)
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    (got.logits.sum() + got.features[-1].mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    (ref.logits.sum() + ref.features[-1].mean()).backward()
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_pico_patch4_window7_224", "convnext_tiny"])
def test_bf16_autocast(name):
    model = _model(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(f).all() for f in out.features)
    out.logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.head.parameters())
