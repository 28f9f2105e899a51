"""FitNet's taps: each CIFAR model's ``hints`` (or ``relu(features)`` where hints is None) equal
the maps mdistiller lists as ``feats``, recomputed here from the model's own modules with forward
hooks.

The tap lists are read off the ``forward`` of megvii-research/mdistiller@e8c5bb3
mdistiller/models/cifar/{resnet.py, resnetv2.py, wrn.py, vgg.py, mobilenetv2.py, ShuffleNetv1.py,
ShuffleNetv2.py}: ``(module whose output is tapped, whether mdistiller takes its ReLU)``. Our
blocks return their residual sums before the ReLU, so "ReLU of the last block's output" is
mdistiller's post-activation stage output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdengine.models import create_model


def _resnet(m):  # resnet.py: f0 = relu(bn1(conv1)), f_i = relu(layer_i's last block sum)
    return [(m.bn1, True), (m.layer1[-1], True), (m.layer2[-1], True), (m.layer3[-1], True)]


def _resnetv2(m):  # resnetv2.py: the same with layer4
    return [(m.bn1, True), *((getattr(m, f"layer{i}")[-1], True) for i in range(1, 5))]


def _wrn(m):  # wrn.py: f0 = conv1(x), f_i = block_i(...), raw: no BN, no ReLU
    return [(m.conv1, False), (m.block1.layer[-1], False), (m.block2.layer[-1], False), (m.block3.layer[-1], False)]


def _vgg(m):  # vgg.py: f_i = relu(block_i(...)), before the pools
    return [(getattr(m, f"block{i}"), True) for i in range(5)]


def _mobilenetv2(m):  # mobilenetv2.py: f0 = conv1 (conv-BN-ReLU); f1-f4 = blocks 1, 2, 4, 6 as they are
    return [(m.conv1, True), (m.blocks[1], False), (m.blocks[2], False), (m.blocks[4], False), (m.blocks[6], False)]


def _shufflenet(m):  # ShuffleNetv1/v2.py: f0 = relu(bn1(conv1)), f_i = stage i's output (after ReLU)
    return [(m.bn1, True), (m.layer1[-1], True), (m.layer2[-1], True), (m.layer3[-1], True)]


# name -> (taps, entry whose mdistiller tap has other channels than ours, hints expected)
FAMILIES = {
    "resnet8": (_resnet, None, False),
    "resnet18_cifar": (_resnetv2, None, False),
    "wrn_16_1": (_wrn, None, True),
    "wrn_40_1": (_wrn, None, True),
    "vgg8": (_vgg, None, False),
    # mdistiller's last tap is block 6's 320-channel map; our last entry is the 1280-channel conv2
    "mobilenetv2_0_5": (_mobilenetv2, 4, True),
    "shufflenetv1": (_shufflenet, None, False),
    # mdistiller's last tap is stage 3's 464 channels; our last entry is the 1024-channel conv2
    "shufflenetv2": (_shufflenet, 3, False),
}


def _mdistiller_taps(model, spec, x):
    """Run ``model`` on ``x``; returns its output and the hooked taps of ``spec``."""
    taps: list = [None] * len(spec)
    handles = []
    for i, (module, relu) in enumerate(spec):
        def hook(_mod, _inp, out, i=i, relu=relu):
            taps[i] = (F.relu(out) if relu else out).clone()
        handles.append(module.register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    assert all(t is not None for t in taps)
    return out, taps


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hints_are_mdistillers_feats(name):
    taps_of, no_counterpart, has_hints = FAMILIES[name]
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        out, taps = _mdistiller_taps(model, taps_of(model), torch.randn(2, 3, 32, 32))
    assert (out.hints is not None) == has_hints
    hints = out.hints if out.hints is not None else [F.relu(f) for f in out.features]
    assert len(hints) == len(out.features) == len(taps)
    assert [h.shape for h in hints] == [f.shape for f in out.features]  # same length, same channels
    for i, (hint, tap) in enumerate(zip(hints, taps)):
        if i == no_counterpart:
            # documented exception: no mdistiller tap of these channels; FitNet gets the pooled map
            assert tap.shape[1] != hint.shape[1]
            assert torch.equal(hint, F.relu(out.features[i]))
        else:
            assert torch.equal(hint, tap), (name, i)
    if has_hints:  # the hints are needed: relu(features) would differ from mdistiller's taps
        assert any(not torch.equal(F.relu(f), t) for f, t in zip(out.features, taps))
