"""load_pretrained: kdengine checkpoints, torchvision state dicts and the CIFAR-KD zoo's files."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from kdengine.models import create_model, load_pretrained


def _zoo_resnetv2_keys(bottleneck: bool, depths: tuple[int, ...]) -> set[str]:
    """State-dict keys of the zoo's ``ResNet18``/``ResNet50`` (mdistiller/models/cifar/resnetv2.py,
    the same file in HobbitLong/RepDistiller), derived from that source independently of ours:
    conv1/bn1, layer1-4 of blocks with conv1-2(3)/bn1-2(3) and a ``shortcut`` Sequential(conv, BN)
    where the shape changes, and the classifier ``linear``."""
    def bn(p):
        return {f"{p}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}

    keys = {"conv1.weight", "linear.weight", "linear.bias", *bn("bn1")}
    convs = 3 if bottleneck else 2
    in_planes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), depths), 1):
        for j in range(n):
            p = f"layer{i}.{j}"
            for c in range(1, convs + 1):
                keys |= {f"{p}.conv{c}.weight", *bn(f"{p}.bn{c}")}
            out = planes * (4 if bottleneck else 1)
            if j == 0 and (i > 1 or in_planes != out):  # stride 2, or the width changes
                keys |= {f"{p}.shortcut.0.weight", *bn(f"{p}.shortcut.1")}
            in_planes = out
    return keys


def _as_zoo(state: dict) -> dict:
    """Our resnet*_cifar state dict in the zoo's names."""
    def zoo(key: str) -> str:
        key = key.replace(".downsample.", ".shortcut.")
        return "linear." + key[len("fc."):] if key.startswith("fc.") else key

    return {zoo(k): v for k, v in state.items()}


def _eval_equal(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        oa, ob = a(x), b(x)
    assert torch.equal(oa.logits, ob.logits)
    assert all(torch.equal(fa, fb) for fa, fb in zip(oa.features, ob.features))


def _trained(name: str, num_classes: int = 10):
    """A model whose BN buffers differ from a fresh one's, so a lost buffer shows in the output."""
    model = create_model(name, num_classes=num_classes)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    return model


@pytest.mark.parametrize("name, bottleneck, depths", [
    ("resnet18_cifar", False, (2, 2, 2, 2)),
    pytest.param("resnet50_cifar", True, (3, 4, 6, 3), marks=pytest.mark.slow),
])
def test_cifar_kd_zoo_resnetv2_teacher_loads(tmp_path, name, bottleneck, depths):
    src = _trained(name)
    zoo = _as_zoo(src.state_dict())
    assert zoo.keys() == _zoo_resnetv2_keys(bottleneck, depths)  # really the zoo's naming
    path = tmp_path / "ckpt_epoch_240.pth"  # CRD's train_teacher.py layout
    torch.save({"epoch": 240, "model": zoo, "accuracy": 78.0, "optimizer": {"state": {}, "param_groups": []}},
               path)
    dst = create_model(name, num_classes=10)
    load_pretrained(dst, path, None, default_index=0)
    _eval_equal(src, dst, torch.randn(2, 3, 32, 32))


def test_zoo_file_with_dataparallel_prefix_and_extra_objects(tmp_path):
    # RepDistiller's *_last.pth also pickles its argparse options (not loadable with weights_only)
    src = _trained("resnet8")
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "resnet8_last.pth"
    torch.save({"opt": argparse.Namespace(model="resnet8"), "model": state, "optimizer": {}}, path)
    dst = create_model("resnet8", num_classes=10)
    load_pretrained(dst, str(path), None, default_index=0)
    _eval_equal(src, dst, torch.randn(2, 3, 32, 32))


def test_linear_classifier_is_not_renamed_where_the_model_has_it(tmp_path):
    src = create_model("shufflenetv1", num_classes=10)
    assert "linear.weight" in src.state_dict()
    path = tmp_path / "shufflenet.pth"
    torch.save({"model": src.state_dict(), "epoch": 240}, path)
    dst = create_model("shufflenetv1", num_classes=10)
    load_pretrained(dst, path, None, default_index=0)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd}], ids=["plain", "state_dict"])
def test_plain_and_wrapped_state_dicts(tmp_path, wrap):
    src = _trained("resnet8")
    path = tmp_path / "w.pt"
    torch.save(wrap(src.state_dict()), path)
    dst = create_model("resnet8", num_classes=10)
    load_pretrained(dst, path, None, default_index=0)
    _eval_equal(src, dst, torch.randn(2, 3, 32, 32))


def test_kdengine_checkpoint_picks_the_model(tmp_path):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    run = tmp_path / "checkpoint.pt"
    # a real run also saves NumPy RNG states, which weights_only refuses
    torch.save({"config": {"models": []}, "models": [a.state_dict(), b.state_dict()],
                "rng": {"numpy": np.random.get_state()}}, run)
    dst = torch.nn.Linear(3, 2)
    load_pretrained(dst, run, 0, default_index=1)
    assert torch.equal(dst.weight, a.weight)
    load_pretrained(dst, run, None, default_index=1)  # its own position in the run
    assert torch.equal(dst.weight, b.weight)
    load_pretrained(dst, run, None, default_index=5)  # fewer models than that: the first
    assert torch.equal(dst.weight, a.weight)
    with pytest.raises(ValueError, match="holds 2 models; index 5 is out of range"):
        load_pretrained(dst, run, 5, default_index=0)


def test_model_index_for_a_one_model_file_is_an_error(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ValueError, match="not a kdengine checkpoint"):
        load_pretrained(torch.nn.Linear(3, 2), path, 1, default_index=0)


def test_mismatched_keys_are_listed(tmp_path):
    model = create_model("resnet8", num_classes=10)
    state = dict(model.state_dict())
    del state["fc.bias"]
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "w.pt"
    torch.save({"model": state}, path)
    listed = r"do not fit CifarResNet: missing keys: fc\.bias; unexpected keys: head\.weight$"
    with pytest.raises(ValueError, match=listed):
        load_pretrained(model, path, None, default_index=0)


def test_wrong_shapes_and_architectures_are_errors(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(create_model("resnet8", num_classes=100).state_dict(), path)
    shapes = (r"do not fit CifarResNet: shapes differ: fc\.bias \(100,\) saved, \(10,\) in the model, "
              r"fc\.weight \(100, 64\) saved, \(10, 64\) in the model$")
    with pytest.raises(ValueError, match=shapes):
        load_pretrained(create_model("resnet8", num_classes=10), path, None, default_index=0)
    # resnet14 has two blocks per stage: 36 keys missing, the first 12 listed
    with pytest.raises(ValueError, match=r"missing keys: layer1\.1\.bn1\.bias, .* \.\.\. and 24 more$"):
        load_pretrained(create_model("resnet14", num_classes=100), path, None, default_index=0)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(torch.nn.Linear(3, 2), tmp_path / "nope.pt", None, default_index=0)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt could not be read"):
        load_pretrained(torch.nn.Linear(3, 2), junk, None, default_index=0)
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3}, odd)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_pretrained(torch.nn.Linear(3, 2), odd, None, default_index=0)


def test_load_pretrained_applies_the_models_own_layout_remap(tmp_path):
    # timm-layout models read older layouts of their architecture (e.g. Swin before timm 0.9)
    # through remap_state_dict, before the strict load.
    model = create_model("resmlp_12_224", num_classes=10, img_size=32)
    legacy = {("legacy." + k): v for k, v in model.state_dict().items()}
    calls = []

    def remap(state):
        calls.append(len(state))
        return {k.removeprefix("legacy."): v for k, v in state.items()}

    model.remap_state_dict = remap
    torch.save(legacy, tmp_path / "legacy.pth")
    load_pretrained(model, tmp_path / "legacy.pth", None, 0)
    assert calls == [len(legacy)]


def test_load_pretrained_reads_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    src = create_model("resnet8", num_classes=10)
    safetensors.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    dst = create_model("resnet8", num_classes=10)
    load_pretrained(dst, tmp_path / "w.safetensors", None, 0)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
