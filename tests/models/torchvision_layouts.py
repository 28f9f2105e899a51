"""torchvision's state-dict layouts for resnet18 and mobilenet_v2, derived from its source
(pytorch/vision torchvision/models/resnet.py and mobilenetv2.py) independently of kdengine's code.

Each function returns ``{key: shape}`` for ``model.state_dict()`` including BN buffers. The
parameter entries (no running stats / counters) sum to torchvision's published counts, which the
tests check, so a slip in this derivation cannot pass unnoticed.
"""
from __future__ import annotations

Shapes = dict[str, tuple[int, ...]]


def _bn(prefix: str, c: int) -> Shapes:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_resnet18(num_classes: int = 1000) -> Shapes:
    # ResNet(BasicBlock, [2, 2, 2, 2]): 7x7 stem, layer1-4 of two blocks; the first block of
    # layer2-4 has stride 2 and a downsample = Sequential(conv1x1, BN).
    s: Shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for i, planes in enumerate((64, 128, 256, 512), 1):
        for j in range(2):
            p = f"layer{i}.{j}"
            stride = 2 if i > 1 and j == 0 else 1
            s[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            s.update(_bn(f"{p}.bn1", planes))
            s[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            s.update(_bn(f"{p}.bn2", planes))
            if stride != 1 or cin != planes:
                s[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                s.update(_bn(f"{p}.downsample.1", planes))
            cin = planes
    s["fc.weight"] = (num_classes, 512)
    s["fc.bias"] = (num_classes,)
    return s


def torchvision_mobilenet_v2(num_classes: int = 1000) -> Shapes:
    # features.0 = ConvNormActivation(3, 32, stride 2) -> .0 conv, .1 BN; then one
    # InvertedResidual per block, whose ``conv`` Sequential is [pw ConvNormAct] (only when
    # t != 1), dw ConvNormAct, pw-linear conv, BN; features.18 = ConvNormActivation(320, 1280, 1);
    # classifier = Sequential(Dropout, Linear).
    setting = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))
    s: Shapes = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    idx, cin = 1, 32
    for t, c, n in setting:
        for _ in range(n):
            p = f"features.{idx}.conv"
            hidden = cin * t
            j = 0
            if t != 1:
                s[f"{p}.0.0.weight"] = (hidden, cin, 1, 1)
                s.update(_bn(f"{p}.0.1", hidden))
                j = 1
            s[f"{p}.{j}.0.weight"] = (hidden, 1, 3, 3)
            s.update(_bn(f"{p}.{j}.1", hidden))
            s[f"{p}.{j + 1}.weight"] = (c, hidden, 1, 1)
            s.update(_bn(f"{p}.{j + 2}", c))
            idx, cin = idx + 1, c
    s[f"features.{idx}.0.weight"] = (1280, cin, 1, 1)
    s.update(_bn(f"features.{idx}.1", 1280))
    s["classifier.1.weight"] = (num_classes, 1280)
    s["classifier.1.bias"] = (num_classes,)
    return s


def parameter_count(shapes: Shapes) -> int:
    total = 0
    for key, shape in shapes.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        n = 1
        for d in shape:
            n *= d
        total += n
    return total
