"""Segmentation models: output contract, output stride 8, the reference layout (dilations, stems,
heads) and ImageNet backbone weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdengine.models import KDModel, count_parameters, create_model
from kdengine.models.resnet_blocks import BasicBlock, Bottleneck
from kdengine.models.segmentation import DilatedResNet, SegModel, SegOutput

K = 7
# (name, block expansion, head feature channels)
MODELS = {"deeplabv3_resnet18": (1, 512), "pspnet_resnet18": (1, 128), "deeplabv3_resnet101": (4, 512),
          "pspnet_resnet101": (4, 256)}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n.endswith("101") else n for n in names]


@pytest.mark.parametrize("deep_stem", [True, False], ids=["deep_stem", "torchvision_stem"])
@pytest.mark.parametrize("name", _params(MODELS))
def test_output_contract_forward_backward(name, deep_stem):
    e, head_channels = MODELS[name]
    model = create_model(name, num_classes=K, deep_stem=deep_stem)
    assert isinstance(model, SegModel) and isinstance(model, KDModel) and model.num_classes == K
    assert model.head_channels == head_channels
    stem = 128 if deep_stem else 64
    assert model.stage_channels == (stem, 64 * e, 128 * e, 256 * e, 512 * e)
    out = model(torch.randn(2, 3, 64, 48))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == out.aux_logits.shape == (2, K, 8, 6)  # output stride 8
    assert out.head_feature.shape == (2, head_channels, 8, 6)
    sizes = [(32, 24), (16, 12), (8, 6), (8, 6), (8, 6)]
    assert [tuple(f.shape) for f in out.features] == [(2, c, *s) for c, s in zip(model.stage_channels, sizes)]
    assert (out.head_feature >= 0).all()  # after the head's ReLU (and dropout)
    labels = torch.randint(0, K, (2, 64, 48))
    up = F.interpolate(out.logits, size=(64, 48), mode="bilinear", align_corners=False)
    aux = F.interpolate(out.aux_logits, size=(64, 48), mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, labels) + 0.4 * F.cross_entropy(aux, labels)
    (loss + sum(f.square().mean() for f in out.features)).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_output_grid_is_ceil_of_an_eighth():
    model = create_model("pspnet_resnet18", num_classes=K).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 47))
    assert out.logits.shape[-2:] == (5, 6)


def test_head_feature_is_what_the_classifier_reads():
    model = create_model("deeplabv3_resnet18", num_classes=K).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(model.head(out.head_feature), out.logits)
        # Pooled vectors [..., C] go through the same weights (ADM classifies region pools).
        pooled = out.head_feature.mean(dim=(2, 3))
        torch.testing.assert_close(model.head(pooled), out.logits.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
        assert model.head(torch.randn(2, 3, 512)).shape == (2, 3, K)


def test_without_aux_head():
    model = create_model("pspnet_resnet18", num_classes=K, aux=False)
    assert model.aux_head is None and not any(n.startswith("aux_head") for n, _ in model.named_parameters())
    assert model(torch.randn(2, 3, 32, 32)).aux_logits is None


def _dilations(stage):
    """(stride, dilation, padding) of every 3x3 conv, per block."""
    out = []
    for block in stage:
        convs = (block.conv1, block.conv2) if isinstance(block, BasicBlock) else (block.conv2,)
        out.append([(c.stride[0], c.dilation[0], c.padding[0]) for c in convs])
    return out


def test_dilations_follow_the_reference_resnet_v1b():
    """CIRKD's resnetv1b (dilated=True): the first block of layer3 / layer4 keeps the previous
    dilation on its entry conv (1 / 2), the rest use 2 / 4; no stride after layer2."""
    r18 = DilatedResNet(BasicBlock, (2, 2, 2, 2))
    assert _dilations(r18.layer3) == [[(1, 1, 1), (1, 2, 2)], [(1, 2, 2), (1, 2, 2)]]
    assert _dilations(r18.layer4) == [[(1, 2, 2), (1, 4, 4)], [(1, 4, 4), (1, 4, 4)]]
    assert _dilations(r18.layer2)[0] == [(2, 1, 1), (1, 1, 1)]
    assert r18.layer3[0].downsample[0].stride == (1, 1) and r18.layer2[0].downsample[0].stride == (2, 2)
    r50 = DilatedResNet(Bottleneck, (3, 4, 6, 3))  # same code path as ResNet-101, fewer blocks
    assert _dilations(r50.layer3) == [[(1, 1, 1)]] + [[(1, 2, 2)]] * 5
    assert _dilations(r50.layer4) == [[(1, 2, 2)], [(1, 4, 4)], [(1, 4, 4)]]


def test_deep_stem_has_the_reference_names_and_shapes():
    state = DilatedResNet(BasicBlock, (2, 2, 2, 2), deep_stem=True).state_dict()
    shapes = {k: tuple(state[k].shape) for k in ("conv1.weight", "conv2.weight", "conv3.weight", "bn3.weight",
                                                  "layer1.0.downsample.0.weight")}
    assert shapes == {"conv1.weight": (64, 3, 3, 3), "conv2.weight": (64, 64, 3, 3), "conv3.weight": (128, 64, 3, 3),
                      "bn3.weight": (128,), "layer1.0.downsample.0.weight": (64, 128, 1, 1)}


def test_torchvision_stem_backbone_is_resnet18_without_its_classifier():
    backbone = DilatedResNet(BasicBlock, (2, 2, 2, 2), deep_stem=False)
    resnet18 = create_model("resnet18", num_classes=1000)
    assert set(backbone.state_dict()) == {k for k in resnet18.state_dict() if not k.startswith("fc.")}
    assert count_parameters(backbone) == count_parameters(resnet18) - count_parameters(resnet18.fc)


def test_imagenet_checkpoint_loads_into_the_backbone(tmp_path):
    """A torchvision-named classification checkpoint fills the backbone (fc dropped); up to
    layer2 the dilated network computes what the classifier network does."""
    resnet18 = create_model("resnet18", num_classes=1000).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18.state_dict(), path)
    model = create_model("deeplabv3_resnet18", num_classes=K, deep_stem=False, backbone_weights=path).eval()
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, resnet18.state_dict()[key], rtol=0, atol=0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = resnet18(x).features[:3]
        got = model(x).features[:3]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_deep_stem_checkpoint_with_wrapper_and_prefix_loads(tmp_path):
    source = DilatedResNet(BasicBlock, (2, 2, 2, 2), deep_stem=True)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save({"state_dict": state}, path)
    model = create_model("pspnet_resnet18", num_classes=K)
    model.load_backbone(path)
    torch.testing.assert_close(model.backbone.conv3.weight, source.conv3.weight, rtol=0, atol=0)


def test_backbone_checkpoint_of_the_other_stem_is_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(create_model("resnet18", num_classes=1000).state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys:.*conv2\.weight"):
        create_model("deeplabv3_resnet18", num_classes=K, deep_stem=True, backbone_weights=path)


def test_heads_follow_the_reference_layout():
    deeplab = create_model("deeplabv3_resnet18", num_classes=K)
    aspp = deeplab.decoder.aspp
    assert [b[0].dilation[0] for b in aspp.branches[1:]] == [12, 24, 36]
    assert aspp.branches[0][0].kernel_size == (1, 1) and aspp.project[0][0].in_channels == 5 * 512
    dropouts = [m.p for m in deeplab.decoder.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.5, 0.1]
    psp = create_model("pspnet_resnet18", num_classes=K)
    assert psp.decoder.ppm.bins == (1, 2, 3, 6) and psp.decoder.ppm.out_channels == 2 * 512
    assert [s[0].out_channels for s in psp.decoder.ppm.stages] == [128] * 4
    aux = psp.aux_head
    assert aux[0][0].in_channels == 256 and aux[0][0].out_channels == 64 and aux[1].p == 0.1
    assert aux[2].out_channels == K


def test_channels_last_equals_contiguous():
    model = create_model("deeplabv3_resnet18", num_classes=K).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.head_feature, ref.head_feature, rtol=1e-4, atol=1e-4)


def test_forward_compiles_without_graph_breaks():
    model = create_model("pspnet_resnet18", num_classes=K).eval()
    x = torch.randn(2, 3, 32, 32)
    got = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got.logits, model(x).logits, rtol=1e-4, atol=1e-4)
