"""OFA-KD: its loss against a hand computation, the stage heads per student family, the method's
terms and gradients, options, and a tiny run through the engine."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdengine.methods import OFA, build_method, method_options, ofa_loss, stage_features
from kdengine.methods.ofa import PatchMerging, SepConv, TokenStageHead
from kdengine.models import create_model
from kdengine.models.imagenet_resnet import ResNet
from kdengine.models.resnet_blocks import BasicBlock
from kdengine.models.swin import SwinTransformer
from kdengine.models.vit import VisionTransformer

K = 5


def tiny(family):
    if family == "resnet":
        return ResNet(BasicBlock, (1, 1, 1, 1), num_classes=K)
    if family == "vit":
        return VisionTransformer(16, 12, 2, num_classes=K, img_size=32, patch_size=8)
    if family == "swin":
        return SwinTransformer(8, (2, 2, 2, 2), (1, 2, 2, 4), num_classes=K, img_size=32, window=4)
    raise ValueError(family)


def build(teacher, student, **ofa):
    torch.manual_seed(0)
    models = [tiny(teacher).eval().requires_grad_(False), tiny(student)]
    return models, build_method("ofa", models, roles=("teacher", "student"), num_classes=K,
                                ofa={"img_size": 32, **ofa})


def batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, K, (b,), generator=g)


def test_ofa_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, generator=g, dtype=torch.float64)
    z_t = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([2, 0, 3])
    eps, tau = 1.5, 2.0
    total = 0.0
    for b in range(3):
        p = [math.exp(v / tau) for v in z[b].tolist()]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / tau) for v in z_t[b].tolist()]
        q = [v / sum(q) for v in q]
        for c in range(4):
            hit = 1.0 if c == y[b] else 0.0
            total -= ((q[c] + hit) ** eps - hit) * math.log(p[c])
    torch.testing.assert_close(ofa_loss(z, z_t, y, eps, tau), torch.tensor(total / 3, dtype=torch.float64))
    # eps = 1: the cross entropy with the teacher's probabilities
    soft = -(F.softmax(z_t, 1) * F.log_softmax(z, 1)).sum(1).mean()
    torch.testing.assert_close(ofa_loss(z, z_t, y, 1.0), soft)
    # soft labels (mixup): the class is their argmax
    torch.testing.assert_close(ofa_loss(z, z_t, F.one_hot(y, 4) * 0.7 + 0.1, eps, tau), ofa_loss(z, z_t, y, eps, tau))


def test_the_teacher_gets_no_gradient_from_the_loss():
    z = torch.randn(2, 3, requires_grad=True)
    z_t = torch.randn(2, 3, requires_grad=True)
    ofa_loss(z, z_t, torch.tensor([0, 1]), 1.2).backward()
    assert z.grad is not None and z_t.grad is None


def test_cnn_student_heads():
    models, method = build("vit", "resnet")
    heads = method.heads["1"]
    # ResNet stage channels 64..512, ViT teacher 16 wide: dim_out = max(512, 16)
    assert [sum(isinstance(m, SepConv) for m in heads[str(k)]) for k in (1, 2, 3)] == [3, 2, 1]
    assert isinstance(heads["4"][0], nn.Conv2d) and heads["4"][0].kernel_size == (1, 1)
    assert heads["4"][0].bias is not None
    assert heads["1"][2].op[5].out_channels == 512 and heads["1"][0].op[5].out_channels == 128
    feats = stage_features(models[1](batch()[0]))
    assert all(heads[str(k)](f).shape == (4, K) for k, f in zip((1, 2, 3, 4), feats))


def test_token_student_heads():
    _, method = build("resnet", "vit")
    heads = method.heads["1"]
    assert all(isinstance(h, TokenStageHead) and h.prefix == 1 for h in heads.values())
    assert [len(heads[str(k)].blocks) for k in (1, 2, 3, 4)] == [3, 2, 1, 1]
    # Swin-P at 224: stage 1 is 56 x 56 x 48 -> three merges to 7 x 7 x 384, GELU after all but the last
    head = TokenStageHead(1, 0, 3136, 48, 384, 100)
    assert [m.side for m in head.merge] == [56, 28, 14]
    assert [type(m.act).__name__ for m in head.merge] == ["GELU", "GELU", "Identity"]
    assert head(torch.randn(2, 3136, 48)).shape == (2, 100)
    # DeiT-T at 224: 14 x 14 -> one merge, which keeps its GELU (the first merge always does)
    head = TokenStageHead(2, 1, 196, 192, 192, 100)
    assert [type(m.act).__name__ for m in head.merge] == ["GELU"] and len(head.blocks) == 2
    assert head(torch.randn(2, 197, 192)).shape == (2, 100)
    # a small Swin (no merge, widths differ): a Linear projection instead
    _, method = build("resnet", "swin")
    assert isinstance(method.heads["1"]["1"].merge[0], nn.Linear)


def test_patch_merging_order():
    m = PatchMerging(2, 1, 4, act=False)
    with torch.no_grad():
        m.norm.weight.fill_(1.0)
        m.norm.bias.zero_()
        m.reduction.weight.copy_(torch.eye(4))
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]]).reshape(1, 4, 1)  # grid [[0, 1], [2, 3]]
    out = m(x)
    # concatenation (0,0), (1,0), (0,1), (1,1): 0, 2, 1, 3, then LayerNorm
    torch.testing.assert_close(out, F.layer_norm(torch.tensor([[[0.0, 2.0, 1.0, 3.0]]]), (4,)))


@pytest.mark.parametrize("teacher, student", [("vit", "resnet"), ("resnet", "vit"), ("resnet", "swin")])
def test_method_terms_and_gradients(teacher, student):
    models, method = build(teacher, student, eps=[1.0, 1.2, 1.4, 1.6, 2.0])
    x, y = batch()
    outputs, out = method.forward_batch(models, x, y)
    assert set(out.terms) == {"ce/1", "kl/1", "hint/1"}
    torch.testing.assert_close(out.total.detach(), sum(out.terms.values()))
    z_s, z_t = outputs[1].logits, outputs[0].logits
    torch.testing.assert_close(out.terms["kl/1"], ofa_loss(z_s, z_t, y, 2.0))
    torch.testing.assert_close(out.terms["ce/1"], F.cross_entropy(z_s, y, label_smoothing=0.1))
    feats = stage_features(outputs[1])
    heads = method.heads["1"]
    want = sum(ofa_loss(heads[str(k)](feats[k - 1]), z_t, y, e) for k, e in zip((1, 2, 3, 4), (1.0, 1.2, 1.4, 1.6)))
    torch.testing.assert_close(out.terms["hint/1"], want)
    out.total.backward()
    assert all(p.grad is None for p in models[0].parameters())
    assert all(p.grad is not None for p in method.heads.parameters())


def test_options():
    assert method_options("ofa")["ofa"]["eps"] == 1.0
    assert method_options("ofa", preset="imagenet")["ofa"]["eps"] == 1.5
    o = method_options("ofa")["ofa"]
    assert (o["ce_weight"], o["kd_weight"], o["ofa_weight"], o["temperature"], o["stages"]) == (1.0, 1.0, 1.0, 1.0,
                                                                                               [1, 2, 3, 4])
    with pytest.raises(ValueError, match="ofa eps: give one value or 3"):
        build("vit", "resnet", stages=[3, 4], eps=[1.0, 2.0])
    with pytest.raises(ValueError, match="ofa stages must be in 1..4"):
        build("vit", "resnet", stages=[0, 4])
    with pytest.raises(ValueError, match="unknown method 'ofa\\+adm'"):
        method_options("ofa+adm")
    _, method = build("vit", "resnet", stages=[2])
    assert list(method.heads["1"]) == ["2"] and isinstance(method, OFA)


def test_trains_through_the_engine(tmp_path, monkeypatch):
    from kdengine.engine import Trainer, load_config

    from ..engine.conftest import TINY

    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(create_model("resnet8", num_classes=4).state_dict(), path)
    overrides = TINY + [f"train.output_dir={tmp_path / 'runs'}", "train.epochs=1", "train.run_name=ofa",
                        f"models.0.checkpoint={path}", "models.0.role=teacher", "method.name=ofa",
                        "method.options={ofa: {img_size: 16}}"]
    trainer = Trainer(load_config(overrides=overrides), progress=False)
    summary = trainer.fit()
    assert summary["status"] == "completed"
    assert not any(p.requires_grad for p in trainer.models[0].parameters())
