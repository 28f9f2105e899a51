"""Every registered model honours the KDModel contract; layouts, compile and autocast work."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from kdengine.models import KDModel, ModelOutput, count_parameters, create_model, list_models, register_model

IMAGENET = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2", "mobilenetv1",
            "mobilenetv2_100"}
# Token models (ViT/DeiT, Swin, Mixer, ResMLP) and ConvNeXt: timm layouts whose features are not
# "[B, C, H, W] before a ReLU"; tests/models/test_timm_layouts.py holds their contract tests.
TIMM_LAYOUTS = {"deit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224",
                "swin_pico_patch4_window7_224", "swin_nano_patch4_window7_224", "mixer_b16_224", "convnext_tiny",
                "resmlp_12_224"}
# Segmentation models return a SegOutput (per-pixel logits); tests/models/test_segmentation.py
# holds their contract tests.
SEGMENTATION = {"deeplabv3_resnet18", "deeplabv3_resnet101", "pspnet_resnet18", "pspnet_resnet101"}
# Seconds each on 2 CPU cores; a smaller sibling with the same code path stays in the fast set
# (resnet8/14/20/8x4, wrn_16_1/16_2/40_1, vgg8/11/13, mobilenetv2_0_5, resnet18/50, ...).
SLOW = {"resnet32", "resnet44", "resnet56", "resnet110", "resnet32x4", "wrn_40_2", "wrn_16_10", "vgg16",
        "vgg19", "mobilenetv2", "resnet34", "resnet101", "resnet152", "resnet50_cifar"}
NUM_CLASSES = 7


def _input(name: str, batch: int = 2, imagenet_size: int = 64) -> torch.Tensor:
    size = imagenet_size if name in IMAGENET else 32
    return torch.randn(batch, 3, size, size)


def _names(exclude=()):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_models() if n not in exclude]


def test_registry_holds_every_family():
    expected = {f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)} | {"resnet8x4", "resnet32x4"}
    expected |= {"wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_16_10"}
    expected |= {f"vgg{d}" for d in (8, 11, 13, 16, 19)}
    expected |= {"mobilenetv2", "mobilenetv2_0_5", "shufflenetv1", "shufflenetv2", "resnet18_cifar", "resnet50_cifar"}
    expected |= IMAGENET | TIMM_LAYOUTS | SEGMENTATION
    assert list_models() == sorted(expected)  # exactly these 45, each once


def test_registry_names_are_the_constructors_names():
    # one decorated function per model: ``grep "def resnet56"`` finds each registry name
    families = [importlib.import_module(f"kdengine.models.{m}") for m in
                ("cifar_resnet", "imagenet_resnet", "wrn", "vgg", "cifar_mobilenetv2", "shufflenet",
                 "imagenet_mobilenet", "vit", "swin", "mlp_mixer", "resmlp", "convnext", "timm_mobilenetv2",
                 "segmentation")]
    for name in list_models():
        ctors = [getattr(m, name) for m in families if callable(getattr(m, name, None))]
        assert len(ctors) == 1 and ctors[0].__name__ == name, name


def test_register_model_bare_and_named_reject_taken_names():
    def resnet8(num_classes: int = 10):  # bare use: the function's name is the registry name
        raise AssertionError("never built")

    def vgg8(num_classes: int = 10):
        raise AssertionError("never built")

    def elsewhere(num_classes: int = 10):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="'resnet8' is registered twice"):
        register_model(resnet8)
    with pytest.raises(ValueError, match="'vgg8' is registered twice"):
        register_model()(vgg8)  # called without a name: the function's name too
    with pytest.raises(ValueError, match="'wrn_16_1' is registered twice"):
        register_model("wrn_16_1")(elsewhere)  # an explicit name wins over the function's


@pytest.mark.parametrize("name", _names(exclude=TIMM_LAYOUTS | SEGMENTATION))
def test_contract_forward_backward(name):
    model = create_model(name, num_classes=NUM_CLASSES)
    assert isinstance(model, KDModel) and model.num_classes == NUM_CLASSES
    model.train()
    model.head.eval()  # no dropout in the head, so its output can be recomputed exactly
    x = _input(name)
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, NUM_CLASSES)
    assert len(out.features) == len(model.stage_channels) >= 3
    sizes = []
    for f, c in zip(out.features, model.stage_channels):
        assert f.shape[:2] == (2, c)
        sizes.append(f.shape[-1])
    assert sizes == sorted(sizes, reverse=True), sizes  # resolution never grows along the list
    if out.hints is not None:  # FitNet's taps: one per feature, same shapes
        assert [h.shape for h in out.hints] == [f.shape for f in out.features]
    # the head maps the GAP of relu(last feature) to the logits (what ADM's pooled path relies on)
    pooled = F.relu(out.features[-1]).mean(dim=(2, 3))
    torch.testing.assert_close(model.head(pooled), out.logits, rtol=1e-4, atol=1e-4)
    # every parameter is reached by the logits and the features
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1])) + sum(f.square().mean() for f in out.features)
    loss.backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_head_accepts_pooled_last_stage():
    model = create_model("resnet8x4", num_classes=NUM_CLASSES)
    assert model.head(torch.randn(5, model.stage_channels[-1])).shape == (5, NUM_CLASSES)


def test_unknown_name_lists_available_models():
    with pytest.raises(ValueError, match="unknown model 'resnet9'") as err:
        create_model("resnet9", num_classes=10)
    for name in ("resnet8", "wrn_40_2", "mobilenet_v2", "mobilenetv2"):
        assert name in str(err.value)


LAYOUT_SUBSET = ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2_0_5", "shufflenetv1", "shufflenetv2",
                 "resnet18", "mobilenet_v2", "mobilenetv1"]


@pytest.mark.parametrize("name", LAYOUT_SUBSET)
def test_channels_last_equals_contiguous(name):
    model = create_model(name, num_classes=NUM_CLASSES).eval()
    x = _input(name)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for g, r in zip(got.features, ref.features):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet8", "shufflenetv2", "mobilenet_v2"])
def test_bf16_autocast(name):
    model = create_model(name, num_classes=NUM_CLASSES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_input(name, imagenet_size=32))
    assert out.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(f).all() for f in out.features)
    out.logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.head.parameters())


@pytest.mark.parametrize("name", ["wrn_16_1", "vgg8", "shufflenetv2", "mobilenet_v2"])
def test_forward_compiles_without_graph_breaks(name):
    # fullgraph=True fails on any graph break (host syncs, data-dependent Python); the "eager"
    # backend stops after Dynamo's capture, which keeps this fast on CPU.
    model = create_model(name, num_classes=NUM_CLASSES)
    model.head.eval()  # no dropout: eager and compiled would draw different masks
    x = _input(name, imagenet_size=32)
    got = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got.logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_compiled_training_step_matches_eager():
    # aot_eager also traces the backward (functionalised, as inductor would see it)
    model = create_model("resnet8", num_classes=NUM_CLASSES)
    x = _input("resnet8")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    ref = model(x)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    (got.logits.sum() + got.features[-1].mean()).backward()
    grad = model.conv1.weight.grad.clone()
    model.zero_grad()
    (ref.logits.sum() + ref.features[-1].mean()).backward()
    torch.testing.assert_close(grad, model.conv1.weight.grad, rtol=1e-4, atol=1e-5)


def test_mobilenet_v2_last_feature_carries_relu6():
    # The classifier pools relu6 of the last conv; relu(features[-1]) must be exactly that.
    model = create_model("mobilenet_v2", num_classes=NUM_CLASSES)
    model.head.eval()
    with torch.no_grad():
        model.features[-1][1].weight.fill_(10.0)  # batch-normalised, then scaled: many values > 6
        out = model(_input("mobilenet_v2"))
    act = F.relu(out.features[-1])
    assert act.max() == 6.0
    torch.testing.assert_close(model.head(act.mean(dim=(2, 3))), out.logits)


def test_zero_init_residual():
    model = create_model("resnet50", num_classes=10, zero_init_residual=True)
    assert all(not b.bn3.weight.any() for layer in (model.layer1, model.layer4) for b in layer)
    assert create_model("resnet18", num_classes=10).layer1[0].bn2.weight.all()


def test_count_parameters_trainable_only():
    model = create_model("resnet8", num_classes=10)
    total = count_parameters(model)
    model.fc.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - 64 * 10 - 10


def test_mobilenetv2_width_kwarg():
    half = create_model("mobilenetv2", num_classes=100, width_mult=0.5)
    assert count_parameters(half) == count_parameters(create_model("mobilenetv2_0_5", num_classes=100))
