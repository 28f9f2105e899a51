"""PAT: the staged teacher forwards, RAA, aligners, prompt blocks, the feedback, the loss, the
``compat="authors"`` deviations, and a tiny run through the engine. Tiny members of each model
family at 32 px (16 px through the engine) keep it fast."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdengine.losses import hcl_loss
from kdengine.methods import PAT, LossOutput, PromptBlock, RegionAwareAttention, build_method, method_options
from kdengine.methods.ofa import drop_class_tokens
from kdengine.methods.pat import SqueezeExcite, sinusoidal_encoding
from kdengine.models import create_model
from kdengine.models.convnext import ConvNeXt
from kdengine.models.imagenet_resnet import ResNet
from kdengine.models.mlp_mixer import MixerBlock, MlpMixer
from kdengine.models.prompts import staged_forward
from kdengine.models.resmlp import Affine, ResBlock, ResMLP
from kdengine.models.resnet_blocks import BasicBlock
from kdengine.models.swin import SwinTransformer
from kdengine.models.vit import VisionTransformer

from .fakes import FakeNet, run

K = 5  # classes
SIZE = 32
SMALL = {"img_size": SIZE, "dim": 32, "num_queries": 16, "heads": 4}


def tiny(family: str) -> nn.Module:
    """A small member of a model family (the same classes as the zoo's), built for 32 px."""
    if family == "resnet":
        return ResNet(BasicBlock, (1, 1, 1, 1), num_classes=K)
    if family == "convnext":
        return ConvNeXt((1, 1, 1, 1), (8, 16, 32, 64), num_classes=K, img_size=SIZE)
    if family == "vit":
        return VisionTransformer(16, 12, 2, num_classes=K, img_size=SIZE, patch_size=8)
    if family == "swin":
        return SwinTransformer(8, (2, 2, 2, 2), (1, 2, 2, 4), num_classes=K, img_size=SIZE, window=4)
    if family == "mixer":
        return MlpMixer(16, 12, lambda d, n, p: MixerBlock(d, n, 8, 32, p), lambda d: nn.LayerNorm(d, eps=1e-6),
                        num_classes=K, img_size=SIZE, patch_size=8)
    if family == "resmlp":
        return ResMLP(16, 12, lambda d, n, p: ResBlock(d, n, drop_path=p), Affine, num_classes=K, img_size=SIZE,
                      patch_size=8)
    raise ValueError(family)


FAMILIES = ("resnet", "convnext", "vit", "swin", "mixer")
MAP_FAMILIES = ("resnet", "convnext")


def batch(b=4, seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randint(0, K, (b,), generator=g)


def build(teacher_family, student_family, roles=("teacher", "student"), seed=0, **options):
    torch.manual_seed(seed)
    teacher = tiny(teacher_family).eval()
    student = tiny(student_family)
    models = [teacher, student] if roles[0] == "teacher" else [student, teacher]
    pat = {**SMALL, **options.pop("pat", {})}
    method = build_method("pat", models, roles=roles, num_classes=K, pat=pat, **options)
    return models, method


def max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------ staged forwards


@pytest.mark.parametrize("family", FAMILIES)
def test_staged_forward_with_the_identity_hook_is_the_models_forward(family):
    torch.manual_seed(0)
    model = tiny(family).eval()
    x, _ = batch(2)
    with torch.no_grad():
        want, got = model(x), staged_forward(model, x)
    assert torch.equal(want.logits, got.logits)
    assert len(want.features) == len(got.features)
    assert all(torch.equal(a, b) for a, b in zip(want.features, got.features))


SITES = {  # per-sample shapes of the four stage inputs at 32 px
    "resnet": [(64, 8, 8), (64, 8, 8), (128, 4, 4), (256, 2, 2)],
    "convnext": [(8, 8, 8), (8, 8, 8), (16, 4, 4), (32, 2, 2)],
    "vit": [(17, 16)] * 4,
    "swin": [(64, 8), (16, 16), (4, 32), (1, 64)],
    "mixer": [(16, 16)] * 4,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_sites_are_the_stage_inputs(family):
    model = tiny(family).eval()
    seen = []

    def hook(i, h):
        seen.append((i, tuple(h.shape[1:])))
        return h

    with torch.no_grad():
        staged_forward(model, batch(1)[0], hook)
    assert seen == list(enumerate(SITES[family]))


def test_staged_forward_refuses_other_families():
    with pytest.raises(TypeError, match="FakeNet has no staged forward.*ResNet, ConvNeXt"):
        staged_forward(FakeNet(), batch(1)[0])
    with pytest.raises(ValueError, match="teacher \\(FakeNet\\) has no prompt sites"):
        build_method("pat", [FakeNet(), tiny("resnet")], roles=("teacher", "student"), num_classes=7, pat=SMALL)


# ------------------------------------------------------------------------------ shapes, loss, gradients


PAIRS = [("resnet", "vit"), ("vit", "resnet"), ("swin", "resnet"), ("convnext", "resmlp"), ("mixer", "resmlp"),
         ("mixer", "swin"), ("resnet", "convnext")]


@pytest.mark.parametrize("compat", [None, "authors"])
@pytest.mark.parametrize("teacher, student", PAIRS)
def test_pairs_train_a_step_and_total_is_the_sum(teacher, student, compat):
    models, method = build(teacher, student, compat=compat)
    x, y = batch()
    method.start_epoch(0, 1)
    outputs, out = method.forward_batch(models, x, y)
    assert isinstance(out, LossOutput)
    assert set(out.terms) == {"ce/1", "kl/1", "hint/1", "reg/0"}
    torch.testing.assert_close(out.total.detach(), sum(out.terms.values()))
    assert [o.logits.shape for o in outputs] == [(4, K), (4, K)]
    assert not outputs[0].logits.requires_grad  # the clean teacher ran under no_grad
    out.total.backward()
    assert all(p.grad is None for p in models[0].parameters())  # the teacher is frozen
    assert all(p.grad is not None for p in method.raa.parameters())
    assert all(p.grad is not None for p in method.aligners.parameters())
    assert all(block.beta.grad is not None and block.beta.grad.abs() > 0 for block in method.prompts)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models[1].parameters())


def test_raa_and_aligners_have_the_specified_shapes():
    # ResNet student at 32 px: stage maps 8, 4, 2, 1 -> patch kernels 2, 1, 1, 1 (the last three upsampled to 4)
    _, method = build("swin", "resnet", pat={"num_queries": 64, "dim": 32, "heads": 8})
    assert [e.patch for e in method.raa.embeds] == [2, 1, 1, 1]
    assert [e.size for e in method.raa.embeds] == [8, 4, 4, 4]
    assert method.raa.per_stage == 16 and method.raa.heads == 8
    # Swin teacher: token aligners to 64 x 8, 16 x 16, 4 x 32, 1 x 64
    x = torch.randn(3, 16, 32)
    assert [tuple(a(x).shape) for a in method.aligners] == [(3, 64, 8), (3, 16, 16), (3, 4, 32), (3, 1, 64)]
    _, method = build("resnet", "vit")
    assert [tuple(a(torch.randn(3, 4, 32)).shape) for a in method.aligners] == [
        (3, 64, 8, 8), (3, 128, 4, 4), (3, 256, 2, 2), (3, 512, 1, 1)]
    assert all(a.project.proj.bias is None for a in method.aligners)


def test_the_map_aligner_is_piecewise_constant():
    _, method = build("resnet", "vit")
    aligner = method.aligners[0].eval()  # 2 x 2 tokens -> 8 x 8: blocks of 4 x 4
    out = aligner(torch.randn(2, 4, 32))
    assert torch.equal(out[..., :4, :4], out[..., :1, :1].expand(-1, -1, 4, 4))


def test_loss_terms_follow_the_formula():
    models, method = build("vit", "resnet", pat={"temperature": 2.0, "label_smoothing": 0.2})
    x, y = batch()
    outputs, out = method.forward_batch(models, x, y)
    z_t, z_s = outputs[0].logits, outputs[1].logits
    log_q = F.log_softmax(z_s, 1)
    ce = -(0.8 * log_q.gather(1, y[:, None]).squeeze(1) + 0.2 * log_q.mean(1)).mean()
    torch.testing.assert_close(out.terms["ce/1"], ce)
    p, log_q2 = F.softmax(z_t / 2, 1), F.log_softmax(z_s / 2, 1)
    torch.testing.assert_close(out.terms["kl/1"], 4 * (p * (p.log() - log_q2)).sum(1).mean())
    assert out.terms["reg/0"].abs() < 1e-6  # beta = 0: the prompted teacher predicts as the clean one


def test_the_feature_loss_trains_the_prompts_and_the_logit_losses_do_not():
    models, method = build("resnet", "vit", pat={"ce_weight": 0.0, "kd_weight": 0.0, "reg_weight": 0.0})
    x, y = batch()
    method.forward_batch(models, x, y)[1].total.backward()
    assert all(b.beta.grad.abs() > 0 for b in method.prompts)
    models, method = build("resnet", "vit", pat={"mse_weight": 0.0, "reg_weight": 0.0})
    method.forward_batch(models, x, y)[1].total.backward()
    assert all(b.beta.grad is None or b.beta.grad.abs() == 0 for b in method.prompts)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in method.raa.parameters())


def test_hcl_target_is_the_prompted_teacher_not_detached():
    models, method = build("vit", "resnet")
    teacher = models[0]
    x, _ = batch()
    with torch.no_grad():
        for block in method.prompts:
            block.beta.fill_(0.5)
    prompted = method.prompted_teacher(teacher, x)
    assert prompted.logits.requires_grad
    with torch.no_grad():
        clean = teacher(x)
    assert max_diff(prompted.logits, clean.logits) > 1e-4
    feats = method._teacher_features(prompted)
    loss = hcl_loss([f.detach() + 1 for f in feats], feats)
    loss.backward()
    assert all(b.beta.grad is not None and b.beta.grad.abs() > 0 for b in method.prompts)


# ------------------------------------------------------------------------------ teacher mode, feedback


def test_teacher_stays_in_eval_mode_and_frozen():
    models, method = build("resnet", "vit")
    teacher = models[0]
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    stats = teacher.bn1.running_mean.clone()
    method.start_epoch(0, 1)
    method.forward_batch(models, *batch())
    assert not teacher.training
    assert torch.equal(teacher.bn1.running_mean, stats)


def test_compat_runs_the_first_batch_of_each_epoch_with_the_teacher_in_train_mode():
    models, method = build("resnet", "vit", compat="authors")
    teacher = models[0]
    stats = teacher.bn1.running_mean.clone()
    method.start_epoch(0, 2)
    method.forward_batch(models, *batch(seed=1))
    assert not teacher.training
    moved = teacher.bn1.running_mean.clone()
    assert not torch.equal(moved, stats)  # the first batch updated the statistics
    method.forward_batch(models, *batch(seed=2))
    assert torch.equal(teacher.bn1.running_mean, moved)
    method.start_epoch(1, 2)
    method.forward_batch(models, *batch(seed=3))
    assert not torch.equal(teacher.bn1.running_mean, moved)


def test_feedback_is_stored_and_fused_from_the_second_step_on():
    models, method = build("convnext", "resnet")
    x, y = batch()
    assert method.has_feedback == 0 and method.feedback_0.shape[0] == 0
    outputs, out = method.forward_batch(models, x, y)
    out.total.backward()
    # no feedback at the first step: the fusion convs are not used
    assert all(p.grad is None for b in method.prompts for p in b.fusion.parameters())
    assert method.has_feedback == 1
    assert method.feedback_1.shape == (4, 16, 4, 4) and method.feedback_1.abs().sum() > 0
    assert not method.feedback_1.requires_grad
    # ConvNeXt stage 2 takes 8 x 8 x 8 and gives 16 x 4 x 4: the feedback is projected
    assert isinstance(method.prompts[0].fb_align, nn.Identity)
    assert not isinstance(method.prompts[1].fb_align, nn.Identity)
    before = method.feedback_1.clone()
    method.zero_grad()
    method.forward_batch(models, *batch(seed=5))[1].total.backward()
    assert all(p.grad is not None for b in method.prompts for p in b.fusion.parameters())
    assert not torch.equal(method.feedback_1, before)  # each step stores its own gap
    # a smaller last batch reads and writes the first rows
    method.forward_batch(models, x[:2], y[:2])
    assert method.feedback_1.shape[0] == 4


def test_feedback_equals_aligned_student_minus_prompted_teacher():
    models, method = build("swin", "resnet")
    x, y = batch()
    method.forward_batch(models, x, y)
    # recompute the step's aligned features and prompted targets with the same (unchanged) modules;
    # the BatchNorms run in train mode, so the batch statistics are the same
    with torch.no_grad():
        method._feedback_ready = False
        aligned = [a(r) for a, r in zip(method.aligners, method.raa(method._student_maps(models[1](x))))]
        targets = method._teacher_features(method.prompted_teacher(models[0], x))
    for i, (a, t) in enumerate(zip(aligned, targets)):
        torch.testing.assert_close(getattr(method, f"feedback_{i}"), a - t)


def test_feedback_survives_a_state_dict_round_trip():
    models, method = build("vit", "resnet")
    method.forward_batch(models, *batch())
    state = method.state_dict()
    assert "has_feedback" in state and state["feedback_0"].shape == (4, 16, 16)
    _, fresh = build("vit", "resnet", seed=1)
    fresh.load_state_dict(state)
    assert fresh._feedback_ready and fresh.feedback_0.shape == (4, 16, 16)
    torch.testing.assert_close(fresh.feedback_0, method.feedback_0)


# ------------------------------------------------------------------------------ compat vs default


@pytest.mark.parametrize("family", FAMILIES)
def test_prompted_teacher_at_beta_zero(family):
    """The default's prompted teacher equals the clean one for every family; the public code's
    (compat) equals it for map teachers only, since its token path reshapes without the transpose."""
    x, _ = batch(2)
    for compat in (None, "authors"):
        models, method = build(family, "resnet", compat=compat)
        with torch.no_grad():
            clean = models[0](x)
            prompted = method.prompted_teacher(models[0], x)
        same = torch.equal(clean.logits, prompted.logits) and all(
            torch.equal(a, b) for a, b in zip(clean.features, prompted.features))
        assert same == (compat is None or family in MAP_FAMILIES), (family, compat)


def test_compat_token_path_is_the_transposed_reshape():
    """At beta = 0 the public code's prompt block returns x.permute(0, 2, 1).reshape(B, L, C) (the
    set-aside last token appended back) for a token input."""
    block = PromptBlock((16, 8), (16, 8), compat=True)
    x = torch.randn(2, 16, 8)
    assert torch.equal(block(x), x.permute(0, 2, 1).reshape(2, 16, 8))
    assert torch.equal(PromptBlock((16, 8), (16, 8))(x), x)
    block = PromptBlock((17, 8), (16, 8), num_prefix_tokens=1, compat=True)
    x = torch.randn(2, 17, 8)
    body = x[:, :-1]
    assert torch.equal(block(x), torch.cat([body.permute(0, 2, 1).reshape(2, 16, 8), x[:, -1:]], 1))
    assert torch.equal(PromptBlock((17, 8), (16, 8), num_prefix_tokens=1)(x), x)


def test_prompt_block_output_with_feedback_and_beta():
    torch.manual_seed(0)
    for compat in (False, True):
        block = PromptBlock((8, 4, 4), (8, 4, 4), compat=compat)
        with torch.no_grad():
            block.beta.fill_(0.5)
        x, fb = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
        fused = block.fusion(torch.cat([x, fb], 1))
        assert fused.shape == ((2, 8, 1, 1) if compat else (2, 8, 4, 4))  # compat: SE returns its gate
        torch.testing.assert_close(block(x, fb), x + 0.5 * block.prompt(fused))
        torch.testing.assert_close(block(x), x + 0.5 * block.prompt(x))
        delta = block(x, fb) - x
        # compat: a per-sample, per-channel constant shift
        assert (max_diff(delta, delta.mean((2, 3), keepdim=True)) < 1e-6) == compat


def test_squeeze_excite_multiplies_unless_gate_only():
    x = torch.randn(2, 32, 3, 3)
    se = SqueezeExcite(32)
    gate = SqueezeExcite(32, gate_only=True)
    gate.load_state_dict(se.state_dict())
    g = gate(x)
    assert g.shape == (2, 32, 1, 1) and ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(se(x), x * g)


def test_class_tokens_dropped():
    x = torch.arange(2 * 17 * 3.0).reshape(2, 17, 3)
    assert torch.equal(drop_class_tokens(x, 1), x[:, 1:])
    assert torch.equal(drop_class_tokens(x, 1, last=True), x[:, :-1])
    sq = x[:, :16]
    assert drop_class_tokens(sq, 0) is sq and drop_class_tokens(sq, 0, last=True) is sq
    m = torch.randn(2, 3, 4, 4)
    assert drop_class_tokens(m, 1) is m


def _raa(batch_encoding):
    torch.manual_seed(0)
    return RegionAwareAttention([(4, 8), (8, 4), (8, 2), (16, 1)], num_queries=16, dim=16, heads=2,
                                batch_encoding=batch_encoding)


def test_raa_encoding_by_token_and_by_batch_position():
    a = [torch.randn(1, c, s, s) for c, s in [(4, 8), (8, 4), (8, 2), (16, 1)]]
    b = [torch.randn_like(t) for t in a]
    ab = [torch.cat([u, v]) for u, v in zip(a, b)]
    ba = [torch.cat([v, u]) for u, v in zip(a, b)]
    for batch_encoding in (False, True):
        raa = _raa(batch_encoding)
        first, second = torch.cat(raa(ab), 1), torch.cat(raa(ba), 1)
        assert first.shape == (2, 16, 16)
        # the method: a sample's output does not depend on its place in the batch
        assert (max_diff(first[0], second[1]) < 1e-5) == (not batch_encoding)
    # token-indexed: the encoding rows follow the tokens; batch-indexed: one row per sample
    assert _raa(False).encoding.shape == (16, 16) and _raa(True).encoding.shape[0] == 5000


def test_raa_matches_a_plain_attention():
    raa = _raa(False)
    maps = [torch.randn(2, c, s, s) for c, s in [(4, 8), (8, 4), (8, 2), (16, 1)]]
    t = raa.norm(torch.cat([e(m) for e, m in zip(raa.embeds, maps)], 1))
    q, (k, v) = raa.q(t), raa.kv(t).chunk(2, -1)
    pos = raa.encoding

    def heads(z):
        return z.reshape(2, 16, 2, 8).transpose(1, 2)

    att = torch.softmax(heads(q + pos) @ heads(k + pos).transpose(-1, -2) / math.sqrt(8), -1)
    want = (att @ heads(v)).transpose(1, 2).reshape(2, 16, 16)
    torch.testing.assert_close(torch.cat(raa(maps), 1), want, atol=1e-5, rtol=1e-4)


def test_sinusoidal_encoding():
    pe = sinusoidal_encoding(10, 8)
    assert pe.shape == (10, 8)
    torch.testing.assert_close(pe[3, 2], torch.tensor(math.sin(3 * 10000 ** (-2 / 8))))
    torch.testing.assert_close(pe[3, 3], torch.tensor(math.cos(3 * 10000 ** (-2 / 8))))
    assert torch.equal(pe[0, 0::2], torch.zeros(4)) and torch.equal(pe[0, 1::2], torch.ones(4))


# ------------------------------------------------------------------------------ options, engine


def test_options_and_errors():
    o = method_options("pat", compat="authors")
    assert o["pat"]["compat"] == "authors" and o["pat"]["mse_weight"] == 1.0 and o["pat"]["dim"] == 512
    assert method_options("pat", preset="imagenet")["pat"] == method_options("pat")["pat"]
    with pytest.raises(ValueError, match="compat is given twice"):
        method_options("pat", compat="authors", pat={"compat": "authors"})
    with pytest.raises(ValueError, match="unknown method 'pat\\+adm'"):
        method_options("pat+adm")
    with pytest.raises(ValueError, match="pat compat must be one of"):
        build("resnet", "vit", compat="author")
    with pytest.raises(ValueError, match="exactly one \\(frozen\\) teacher and one student"):
        build_method("pat", [tiny("resnet")] * 3, roles=("teacher", "student", "student"), num_classes=K)
    with pytest.raises(ValueError, match="no model declares its input size: give method.options.pat.img_size"):
        build_method("pat", [tiny("resnet"), tiny("resnet")], roles=("teacher", "student"), num_classes=K)
    with pytest.raises(ValueError, match="num_queries / stages = 12 / 4 must be a perfect square"):
        build("resnet", "vit", pat={"num_queries": 12})
    models, method = build("resnet", "vit")
    with pytest.raises(ValueError, match="built for 32-px inputs"):
        method.forward_batch(models, torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="forward_batch"):
        method([], torch.zeros(2))
    assert isinstance(method, PAT) and method.name == "pat"
    assert set(method.parameter_counts()) == {"raa", "aligners", "prompts"}


def test_teacher_second_in_the_roles():
    models, method = build("vit", "resnet", roles=("student", "teacher"))
    assert method.trainable == (True, False)
    outputs, out = method.forward_batch(models, *batch())
    assert set(out.terms) == {"ce/0", "kl/0", "hint/0", "reg/1"}
    assert outputs[1].logits.shape == (4, K) and not outputs[1].logits.requires_grad


def test_default_forward_batch_is_the_engine_path_for_other_methods():
    torch.manual_seed(0)
    models = [FakeNet((4, 8, 16)), FakeNet()]
    method = build_method("kd", models, roles=("teacher", "student"), num_classes=7)
    x = torch.randn(3, 3, 8, 8)
    y = torch.tensor([0, 3, 6])
    outputs, out = method.forward_batch(models, x, y)
    want = method(run(models, method.trainable, x), y)
    assert torch.equal(out.total, want.total)
    assert not outputs[0].logits.requires_grad and outputs[1].logits.requires_grad


def test_trains_through_the_engine(tmp_path, monkeypatch):
    """A tiny PAT run: a ResNet-18 teacher (checkpoint saved here) and a ResNet-8 student on the
    embedded set, through the Trainer and its checkpoint."""
    from kdengine.engine import Trainer, load_config

    from ..engine.conftest import TINY

    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    teacher = create_model("resnet18", num_classes=4)
    torch.save(teacher.state_dict(), path)
    overrides = TINY + [f"train.output_dir={tmp_path / 'runs'}", "train.epochs=1", "train.run_name=pat",
                        "models.0.name=resnet18", f"models.0.checkpoint={path}", "method.name=pat",
                        "method.options={pat: {dim: 32, num_queries: 16, heads: 4}}"]  # img_size: the data's
    trainer = Trainer(load_config(overrides=overrides), progress=False)
    assert trainer.method.img_size == 16  # from the training loader: no model declares a size
    before = [b.beta.detach().clone() for b in trainer.method.prompts]
    summary = trainer.fit()
    assert summary["status"] == "completed"
    assert not any(p.requires_grad for p in trainer.models[0].parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(trainer.models[0].state_dict()[key], value), key
    assert any(not torch.equal(b.beta, old) for b, old in zip(trainer.method.prompts, before))
    assert trainer.method.has_feedback == 1
    assert all(math.isfinite(v) for v in summary["last"].values() if isinstance(v, float))


def test_steps_after_the_first_backpropagate_through_the_feedback_they_read():
    """At 16 px a ResNet teacher's last stage keeps its 1 x 1 side while the channels change: the
    feedback goes into the aligner's BatchNorm as it is read, so the step must not overwrite what
    its own backward needs."""
    torch.manual_seed(0)
    models = [tiny("resnet").eval(), tiny("resnet")]
    method = build_method("pat", models, roles=("teacher", "student"), num_classes=K, pat={**SMALL, "img_size": 16})
    for seed in range(3):
        method.forward_batch(models, *batch(seed=seed, size=16))[1].total.backward()
    assert isinstance(method.prompts[3].fb_align.norm, nn.BatchNorm2d)


def test_soft_targets():
    models, method = build("vit", "resnet")
    x, y = batch()
    soft = F.one_hot(y, K).float() * 0.6 + 0.08
    outputs, out = method.forward_batch(models, x, soft)
    torch.testing.assert_close(out.terms["ce/1"], -(soft * F.log_softmax(outputs[1].logits, 1)).sum(1).mean())
    with pytest.raises(ValueError, match=r"target must be \[B\] = \[4\] or \[B, 5\] soft targets"):
        method.forward_batch(models, x, soft[:, :3])


@pytest.mark.slow
def test_a_vit_teacher_trained_here_teaches_pat_and_ofa(tmp_path, monkeypatch):
    """The heterogeneous pair of the issue on the embedded set: a DeiT-T teacher (4-px patches at 16
    px) trained with vanilla, then a ResNet-8 student distilled from it with PAT and with OFA."""
    from kdengine.engine import Trainer, load_config

    from ..engine.conftest import TINY

    monkeypatch.setenv("KDENGINE_CACHE", str(tmp_path / "cache"))
    vit = ["models.0.name=deit_tiny_patch16_224", "models.0.kwargs={img_size: 16, patch_size: 4}"]
    base = TINY + vit + [f"train.output_dir={tmp_path / 'runs'}", "train.epochs=1"]
    teacher = Trainer(load_config(overrides=base + ["train.run_name=vit", "method.name=vanilla"]), progress=False)
    teacher.fit()
    path = teacher.run_dir / "checkpoint.pt"
    for name, options in (("pat", "{pat: {dim: 32, num_queries: 16, heads: 4}}"), ("ofa", "{}")):
        run = Trainer(load_config(overrides=base + [f"train.run_name={name}", f"method.name={name}",
                                                    f"models.0.checkpoint={path}", f"method.options={options}"]),
                      progress=False)
        assert run.method.img_size == 16  # the ViT's own
        summary = run.fit()
        assert summary["status"] == "completed", name
        for key, value in teacher.models[0].state_dict().items():
            assert torch.equal(run.models[0].state_dict()[key], value), (name, key)


# the spec's parameter counts at 224 px (measured on the authors' code), in millions
RAA_M = {"resnet18": 13.57, "deit_tiny_patch16_224": 7.08, "swin_pico_patch4_window7_224": 10.38,
         "resmlp_12_224": 13.37, "mobilenetv2_100": 7.41}
ALIGN_PROMPT_M = {"swin_tiny_patch4_window7_224": (0.81, 24.1), "vit_small_patch16_224": (0.80, 18.2),
                  "convnext_tiny": (0.74, 6.65), "mixer_b16_224": (1.60, 72.7), "resnet50": (1.97, 45.3),
                  "deit_tiny_patch16_224": (0.41, 4.56)}


@pytest.mark.slow
def test_module_sizes_at_224_match_the_authors_code():
    def count(teacher, student):
        models = [create_model(teacher, num_classes=100), create_model(student, num_classes=100)]
        return build_method("pat", models, roles=("teacher", "student"), num_classes=100,
                            pat={"img_size": 224}).parameter_counts()

    for student, raa in RAA_M.items():
        teacher = "resnet50" if student == "deit_tiny_patch16_224" else "deit_tiny_patch16_224"
        assert round(count(teacher, student)["raa"] / 1e6, 2) == raa, student
    for teacher, (aligners, prompts) in ALIGN_PROMPT_M.items():
        c = count(teacher, "resnet18")
        assert round(c["aligners"] / 1e6, 2) == aligners, teacher
        assert round(c["prompts"] / 1e6, 2 if prompts < 10 else 1) == prompts, teacher
