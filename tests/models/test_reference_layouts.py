"""The zoo against its references: parameter counts, torchvision and CRD-zoo state-dict layouts."""
from __future__ import annotations

import hashlib

import pytest
import torch

from kdengine.models import count_parameters, create_model

from .torchvision_layouts import parameter_count, torchvision_mobilenet_v2, torchvision_resnet18

# torchvision's published counts (num_classes=1000): its weights' meta "num_params".
TORCHVISION_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "mobilenet_v2": 3_504_872,
}

# Parameter count and sha256 (first 16 hex digits) of the sorted "key shape" lines of the state
# dict, num_classes=100, obtained by instantiating the CRD zoo's definitions as shipped in
# megvii-research/mdistiller@a08d46f mdistiller/models/cifar (resnet.py, wrn.py, vgg.py
# ``vgg*_bn``, mobilenetv2.py ``mobilenetv2_T_w(6, w)``, ShuffleNetv1/v2.py; wrn_16_10 as
# ``WideResNet(16, widen_factor=10)``). Equal hashes mean the zoo's checkpoints load with
# strict=True.
CRD_ZOO = {
    "resnet8": (83_892, "99cb0c0b2ea3c613"),
    "resnet14": (181_108, "629933907d5744ff"),
    "resnet20": (278_324, "0386434ca6f34c26"),
    "resnet32": (472_756, "9e5592f61f0020a8"),
    "resnet44": (667_188, "df3dce284c7a26b4"),
    "resnet56": (861_620, "fa692cabb2e3a217"),
    "resnet110": (1_736_564, "9ca5a9542fb3a343"),
    "resnet8x4": (1_233_540, "b2ead61a142ef3af"),
    "resnet32x4": (7_433_860, "99154b2aea1aeb59"),
    "wrn_16_1": (180_916, "b4de1d786e12f08a"),
    "wrn_16_2": (703_284, "2266f04469bf5dd9"),
    "wrn_40_1": (569_780, "01abc5646d8c075c"),
    "wrn_40_2": (2_255_156, "595ec0db20d1ca1c"),
    "wrn_16_10": (17_174_324, "357ae0511d1351c6"),
    "vgg8": (3_965_028, "7f85b8479109415f"),
    "vgg11": (9_277_284, "6053995f63325762"),
    "vgg13": (9_462_180, "5778ceb5832ef6a7"),
    "vgg16": (14_774_436, "0729229b18559f53"),
    "vgg19": (20_086_692, "e27ccb5da4f3ad9e"),
    "mobilenetv2": (2_353_060, None),  # the zoo registers only width 0.5; same layout
    "mobilenetv2_0_5": (812_836, "54501c9a7e317631"),
    "shufflenetv1": (949_258, "1282e767b3e9c6cd"),
    "shufflenetv2": (1_355_528, "9b7750ae03289b13"),
    # resnetv2.py ResNet18/ResNet50; our copies use torchvision's names, so only counts compare
    "resnet18_cifar": (11_220_132, None),
    "resnet50_cifar": (23_705_252, None),
}
# mdistiller@a08d46f mdistiller/models/imagenet/mobilenetv1.py (1000 classes); the ADM paper
# quotes 4.23M.
MOBILENETV1_COUNT = 4_231_976


def _meta_model(name: str, num_classes: int):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return create_model(name, num_classes=num_classes)


def _layout_hash(model) -> str:
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_imagenet_parameter_counts_equal_torchvision(name):
    assert count_parameters(_meta_model(name, 1000)) == TORCHVISION_COUNTS[name]


def test_mobilenetv1_parameter_count():
    assert count_parameters(_meta_model("mobilenetv1", 1000)) == MOBILENETV1_COUNT


def test_mobilenet_v2_half_width_matches_paper():
    # ADM's "0.5MobileNetV2 (1.97M parameters)" on ImageNet
    with torch.device("meta"):
        model = create_model("mobilenet_v2", num_classes=1000, width_mult=0.5)
    assert round(count_parameters(model) / 1e6, 2) == 1.97


@pytest.mark.parametrize("name", sorted(CRD_ZOO))
def test_cifar_models_match_crd_zoo(name):
    count, layout = CRD_ZOO[name]
    model = _meta_model(name, 100)
    assert count_parameters(model) == count
    if layout is not None:
        assert _layout_hash(model) == layout


@pytest.mark.parametrize("name, layout, count", [
    ("resnet18", torchvision_resnet18, "resnet18"),
    ("mobilenet_v2", torchvision_mobilenet_v2, "mobilenet_v2"),
])
def test_torchvision_state_dict_layout(name, layout, count):
    expected = layout(1000)
    assert parameter_count(expected) == TORCHVISION_COUNTS[count]  # the derivation itself is right
    model = create_model(name, num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got.keys() == expected.keys(), (sorted(got.keys() - expected.keys()), sorted(expected.keys() - got.keys()))
    assert got == expected
    # a checkpoint with exactly these keys loads strictly and lands where it should
    g = torch.Generator().manual_seed(1)
    ckpt = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g))
            for k, shape in expected.items()}
    model.load_state_dict(ckpt, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt[k]), k
