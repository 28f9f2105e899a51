"""FitNet's hint maps against the public CIFAR-KD code's taps (mdistiller's ``feats``, which its
FitNet regresses at ``FITNET.HINT_LAYER = 2``), written out from mdistiller's ``forward`` of each
family with the zoo model's own modules (the zoo keeps mdistiller's layers and names)."""
import pytest
import torch
import torch.nn.functional as F

from kdengine.methods import build_method, hint_map
from kdengine.models import create_model

MDISTILLER_HINT_LAYER = 2


def _relu_blocks(blocks, x):
    """mdistiller's blocks end in their ReLU; the zoo's return the pre-activation."""
    for block in blocks:
        x = F.relu(block(x))
    return x


def _shuffle(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def resnet_taps(m, x):  # mdistiller/models/cifar/resnet.py (and resnetv2.py with a layer4)
    f = [F.relu(m.bn1(m.conv1(x)))]
    for layer in [m.layer1, m.layer2, m.layer3] + ([m.layer4] if hasattr(m, "layer4") else []):
        f.append(_relu_blocks(layer, f[-1]))
    return f


def wrn_taps(m, x):  # wrn.py: the raw block outputs; the zoo's blocks are mdistiller's units
    f = [m.conv1(x)]
    for block in (m.block1, m.block2, m.block3):
        f.append(block(f[-1]))
    return f


def vgg_taps(m, x):  # vgg.py at 32 px (no pool after block3)
    f = [F.relu(m.block0(x))]
    for i, block in enumerate((m.block1, m.block2, m.block3, m.block4), 1):
        f.append(F.relu(block(F.max_pool2d(f[-1], 2) if i <= 3 else f[-1])))
    return f


def mobilenetv2_taps(m, x):  # mobilenetv2.py: conv1 ends in a ReLU, blocks end linear
    b = m.blocks
    f0 = F.relu(m.conv1(x))
    f1 = b[1](b[0](f0))
    f2 = b[2](f1)
    f3 = b[4](b[3](f2))
    f4 = b[6](b[5](f3))  # 320 channels: no counterpart in the zoo's last (1280-channel) entry
    return [f0, f1, f2, f3, f4]


def shufflenetv1_taps(m, x):  # ShuffleNetv1.py
    f = [F.relu(m.bn1(m.conv1(x)))]
    for layer in (m.layer1, m.layer2, m.layer3):
        f.append(_relu_blocks(layer, f[-1]))
    return f


def shufflenetv2_taps(m, x):  # ShuffleNetv2.py, its DownBlock and BasicBlock written out
    def down(b, x):
        left = F.relu(b.bn2(b.conv2(b.bn1(b.conv1(x)))))
        right = F.relu(b.bn5(b.conv5(b.bn4(b.conv4(F.relu(b.bn3(b.conv3(x))))))))
        return _shuffle(torch.cat([left, right], 1), 2)

    def basic(b, x):
        c = int(x.shape[1] * 0.5)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(b.bn3(b.conv3(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x2))))))))
        return _shuffle(torch.cat([x1, out], 1), 2)

    f = [F.relu(m.bn1(m.conv1(x)))]
    for layer in (m.layer1, m.layer2, m.layer3):
        y = down(layer[0], f[-1])
        for block in layer[1:]:
            y = basic(block, y)
        f.append(y)
    return f  # f[3]: 464 channels; the zoo's last entry is the 1024-channel conv2 map


# (model, taps, entries whose tap has the feature's shape)
FAMILIES = {
    "resnet8": (resnet_taps, 4),
    "resnet8x4": (resnet_taps, 4),
    "resnet18_cifar": (resnet_taps, 5),
    "wrn_16_2": (wrn_taps, 4),
    "vgg8": (vgg_taps, 5),
    "mobilenetv2_0_5": (mobilenetv2_taps, 4),
    "shufflenetv1": (shufflenetv1_taps, 4),
    "shufflenetv2": (shufflenetv2_taps, 3),
}


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hint_maps_are_mdistillers_feats(name, images):
    taps_of, n = FAMILIES[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        out = model(images)
        taps = taps_of(model, images)
    assert len(taps) == len(out.features)
    if out.hints is not None:  # the contract: one hint per feature, same channels
        assert [h.shape[:2] for h in out.hints] == [f.shape[:2] for f in out.features]
    for i in range(n):
        torch.testing.assert_close(hint_map(out, i), taps[i], msg=lambda m: f"{name} entry {i}: {m}")
    assert len(out.features) // 2 == MDISTILLER_HINT_LAYER  # FitNet's default is mdistiller's layer


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fitnet_regresses_mdistillers_taps(name, images):
    """FitNet(teacher, student) of one family, default hint layer: CE + 100 * MSE(r(tap_s), tap_t)."""
    taps_of, _ = FAMILIES[name]
    torch.manual_seed(0)
    teacher, student = (create_model(name, num_classes=10).eval() for _ in range(2))
    method = build_method("fitnet", [teacher, student], roles=("teacher", "student"), num_classes=10).eval()
    h = MDISTILLER_HINT_LAYER
    assert method.hint_layers == {1: (h, h)}
    y = torch.tensor([3, 7])
    with torch.no_grad():
        outs = [teacher(images), student(images)]
        got = method(outs, y).total
        t_tap, s_tap = taps_of(teacher, images)[h], taps_of(student, images)[h]
        want = F.cross_entropy(outs[1].logits, y) + 100.0 * F.mse_loss(method.regressors["1"](s_tap), t_tap)
    torch.testing.assert_close(got, want)
