"""Offline methods (frozen teacher) against hand-written formulas."""
import pytest
import torch
import torch.nn.functional as F

from kdengine.losses import ADMLoss
from kdengine.methods import DKD, KD, FitNet, build_method, dkd_parts, hint_map
from kdengine.models.base import ModelOutput

from .fakes import FakeNet, batch, random_outputs, run

T_CH, S_CH = (4, 8, 16), (4, 8, 8)
ROLES = ("teacher", "student")


def ce(z, y):
    return -torch.log_softmax(z, 1)[torch.arange(len(y)), y].mean()


def kl_probs(p, q):
    """mean_b sum_c p log(p / q) for probability rows."""
    return (torch.xlogy(p, p) - p * torch.log(q)).sum(1).mean()


def frozen(outs):
    """The teacher's output as the engine gives it: computed under no_grad."""
    t = outs[0]
    hints = None if t.hints is None else [h.detach() for h in t.hints]
    return [ModelOutput(t.logits.detach(), [f.detach() for f in t.features], hints), *outs[1:]]


def models():
    return [FakeNet(T_CH).double(), FakeNet(S_CH).double()]


def outputs(b=5, seed=2):
    return frozen(random_outputs([T_CH, S_CH], b=b, seed=seed))


def target(b=5):
    return torch.randint(0, 7, (b,), generator=torch.Generator().manual_seed(9))


def test_kd_is_hinton():
    outs, y = outputs(), target()
    m = build_method("kd", models(), roles=ROLES, num_classes=7)
    assert m.trainable == (False, True)
    out = m(outs, y)
    zt, zs = outs[0].logits, outs[1].logits
    T = 4.0
    hand = 0.1 * ce(zs, y) + 0.9 * T**2 * kl_probs(torch.softmax(zt / T, 1), torch.softmax(zs / T, 1))
    torch.testing.assert_close(out.total, hand)
    m = build_method("kd", models(), roles=ROLES, num_classes=7, preset="imagenet")
    hand = 0.5 * ce(zs, y) + 0.5 * kl_probs(torch.softmax(zt, 1), torch.softmax(zs, 1))
    torch.testing.assert_close(m(outs, y).total, hand)


def _dkd_by_hand(zs, zt, y, T):
    ps, pt = torch.softmax(zs / T, 1), torch.softmax(zt / T, 1)
    rows = torch.arange(len(y))
    gs, gt = ps[rows, y], pt[rows, y]
    bs, bt = torch.stack([gs, 1 - gs], 1), torch.stack([gt, 1 - gt], 1)
    tckd = T**2 * kl_probs(bt, bs)
    keep = ~F.one_hot(y, zs.shape[1]).bool()
    qs = ps[keep].view(len(y), -1) / (1 - gs).unsqueeze(1)
    qt = pt[keep].view(len(y), -1) / (1 - gt).unsqueeze(1)
    nckd = T**2 * kl_probs(qt, qs)
    return tckd, nckd


def test_dkd_parts_match_the_decoupled_formula():
    outs, y = outputs(), target()
    zt, zs = outs[0].logits, outs[1].logits
    for T in (1.0, 4.0):
        tckd, nckd = dkd_parts(zs, zt, y, T)
        want_t, want_n = _dkd_by_hand(zs, zt, y, T)
        torch.testing.assert_close(tckd, want_t)
        torch.testing.assert_close(nckd, want_n)
    # TCKD + (1 - p_gt^t) NCKD is classical KD (DKD Eq. 4), averaged over samples
    T = 4.0
    ps, pt = torch.softmax(zs / T, 1), torch.softmax(zt / T, 1)
    gt = pt[torch.arange(len(y)), y]
    per_sample_kd = (torch.xlogy(pt, pt) - pt * torch.log(ps)).sum(1)
    b = [dkd_parts(zs[i:i + 1], zt[i:i + 1], y[i:i + 1], T) for i in range(len(y))]
    recombined = torch.stack([tc + (1 - gt[i]) * nc for i, (tc, nc) in enumerate(b)]) / T**2
    torch.testing.assert_close(recombined, per_sample_kd)


def test_dkd_total_and_linear_warmup():
    outs, y = outputs(), target()
    zt, zs = outs[0].logits, outs[1].logits
    m = build_method("dkd", models(), roles=ROLES, num_classes=7, dkd={"warmup": 4, "beta": 6.0})
    tckd, nckd = _dkd_by_hand(zs, zt, y, 4.0)
    for epoch, factor in [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (10, 1.0)]:
        m.start_epoch(epoch, 20)
        out = m(outs, y)
        assert out.terms["warmup"].item() == factor
        torch.testing.assert_close(out.total, ce(zs, y) + factor * (tckd + 6.0 * nckd))
    assert m.state_dict()["warmup_factor"].item() == 1.0  # a buffer: saved, moved, graph-visible


@pytest.mark.parametrize("warmup", [3, 7, 20])
def test_dkd_warmup_factor_is_mdistillers_formula_exactly(warmup):
    """mdistiller: ``min(epoch / warmup, 1.0)`` with 1-based epochs, a Python float. The buffer holds
    that value exactly at every epoch of a long schedule, and the fp32 loss is scaled by its fp32
    rounding (what multiplying an fp32 tensor by the Python float gives)."""
    outs, y = frozen(random_outputs([T_CH, S_CH], b=5, seed=2, dtype=torch.float32)), target()
    m = build_method("dkd", models(), roles=ROLES, num_classes=7, dkd={"warmup": warmup})
    buf = m.warmup_factor
    zt, zs = outs[0].logits, outs[1].logits
    tckd, nckd = dkd_parts(zs, zt, y, 4.0)
    for epoch in range(240):
        m.start_epoch(epoch, 240)
        python = min((epoch + 1) / warmup, 1.0)  # mdistiller's epoch is ours + 1
        assert m.warmup_factor is buf and buf.item() == python  # updated in place, exact
        if epoch % 37 == 0 or epoch in (warmup - 2, warmup - 1, warmup):
            out = m(outs, y)
            assert out.terms["kl/1"].dtype == torch.float32
            assert torch.equal(out.terms["kl/1"], python * (1.0 * tckd + 8.0 * nckd))


def test_dkd_forward_has_no_host_sync():
    """The warm-up factor is read on the device: dynamo traces the forward as one graph (as CUDA-graph
    capture needs), and the traced step sees a new factor after start_epoch."""
    outs, y = outputs(), target()
    m = build_method("dkd", models(), roles=ROLES, num_classes=7, dkd={"warmup": 3})
    compiled = torch.compile(lambda o, t: m(o, t), backend="eager", fullgraph=True)
    for epoch in (0, 1, 5):
        m.start_epoch(epoch, 10)
        torch.testing.assert_close(compiled(outs, y).total, m(outs, y).total)
        assert compiled(outs, y).terms["warmup"].item() == min((epoch + 1) / 3, 1.0)


def test_fitnet_hint_on_the_middle_stage():
    outs, y = outputs(), target()
    ms = models()
    m = build_method("fitnet", ms, roles=ROLES, num_classes=7).double()
    assert m.hint_layers == {1: (1, 1)}
    out = m(outs, y)
    reg = m.regressors["1"]
    f_s = F.relu(reg.bn(reg.conv(F.relu(outs[1].features[1]))))
    hand = ce(outs[1].logits, y) + 100.0 * ((f_s - F.relu(outs[0].features[1])) ** 2).mean()
    torch.testing.assert_close(out.total, hand)
    assert all(p.grad is None for p in ms[0].parameters())
    out.total.backward()
    assert all(p.grad is not None for p in reg.parameters())  # the regressor is the method's to train


def test_fitnet_regresses_the_hints_where_a_model_lists_them():
    """ModelOutput.hints (mdistiller's ``feats`` where they are not relu(features)) is what FitNet
    regresses, on either side; the teacher's hint is detached."""
    ms = models()
    m = build_method("fitnet", ms, roles=ROLES, num_classes=7).double()
    reg = m.regressors["1"]
    y = target()
    for with_hints in [(0, 1), (0,), (1,)]:
        outs = frozen(random_outputs([T_CH, S_CH], b=5, seed=3, hints=with_hints))
        h_t = outs[0].hints[1] if 0 in with_hints else F.relu(outs[0].features[1])
        h_s = outs[1].hints[1] if 1 in with_hints else F.relu(outs[1].features[1])
        assert hint_map(outs[0], 1) is h_t or torch.equal(hint_map(outs[0], 1), h_t)
        out = m(outs, y)
        f_s = F.relu(reg.bn(reg.conv(h_s)))
        hand = ce(outs[1].logits, y) + 100.0 * ((f_s - h_t) ** 2).mean()
        torch.testing.assert_close(out.total, hand)
        g_feat, g_hint = torch.autograd.grad(
            out.total, [outs[1].features[1], (outs[1].hints or outs[1].features)[1]], allow_unused=True)
        if 1 in with_hints:  # the student's hint, not its feature, carries the gradient
            assert g_feat is None and g_hint.abs().sum() > 0
    # the fakes' own forward: hints = 2 * features, both models
    ms = [FakeNet(T_CH, hints=True).double(), FakeNet(S_CH, hints=True).double()]
    m = build_method("fitnet", ms, roles=ROLES, num_classes=7).double()
    x, y = batch()
    outs = run(ms, m.trainable, x.double())
    reg = m.regressors["1"]
    f_s = F.relu(reg.bn(reg.conv(2 * outs[1].features[1])))
    hand = ce(outs[1].logits, y) + 100.0 * ((f_s - 2 * outs[0].features[1]) ** 2).mean()
    torch.testing.assert_close(m(outs, y).total, hand)


def test_hint_map_checks_the_hints_length():
    (out,) = random_outputs([S_CH], hints=(0,))
    with pytest.raises(ValueError, match=r"one map per entry of features \(3\), got 2"):
        hint_map(ModelOutput(out.logits, out.features, out.hints[:2]), 1)


def test_fitnet_pools_the_larger_map_when_sizes_differ():
    teacher, stud = FakeNet((4, 8, 16, 16)).double(), FakeNet(S_CH).double()
    m = build_method("fitnet", [teacher, stud], roles=ROLES, num_classes=7, fitnet={"feat_weight": 2.0}).double()
    assert m.hint_layers == {1: (1, 2)}  # student's stage 1 (4x4) vs teacher's stage 2 (2x2)
    outs = frozen(random_outputs([(4, 8, 16, 16), S_CH]))
    y = target(4)
    reg = m.regressors["1"]
    f_s = F.adaptive_avg_pool2d(F.relu(reg.bn(reg.conv(F.relu(outs[1].features[1])))), 2)
    hand = ce(outs[1].logits, y) + 2.0 * ((f_s - F.relu(outs[0].features[2])) ** 2).mean()
    torch.testing.assert_close(m(outs, y).total, hand)
    with pytest.raises(ValueError, match="hint_layer 5 is out of range"):
        build_method("fitnet", [teacher, stud], roles=ROLES, num_classes=7, fitnet={"hint_layer": 5})


@pytest.mark.parametrize("base", ["kd", "dkd", "fitnet"])
def test_offline_adm_adds_the_students_consensus_loss_only(base):
    """Sec. 5.5: alpha/beta/gamma = 1/0/0 (CIFAR): base loss + L_co; the teacher is untouched."""
    ms = models()
    plain = build_method(base, ms, roles=ROLES, num_classes=7).double()
    m = build_method(f"{base}+adm", ms, roles=ROLES, num_classes=7).double()
    if base == "fitnet":
        m.regressors.load_state_dict(plain.regressors.state_dict())
    x, y = batch()
    outs = run(ms, m.trainable, x.double())
    out = m(outs, y)
    stock = ADMLoss(ms[1].head, ms[0].head, 1.0, 0.0, 0.0, student_channels=S_CH, teacher_channels=T_CH).double()
    stock.load_state_dict(m.adm.losses[0].state_dict())
    torch.testing.assert_close(out.total, plain(outs, y).total + stock(outs[1].features, outs[0].features, y))
    assert "di/0" not in out.terms and "adm/0" not in out.terms
    out.total.backward()
    assert all(p.grad is None for p in ms[0].parameters())
    assert all(p.grad is not None for p in ms[1].parameters())


def test_offline_adm_imagenet_weights():
    ms = models()
    m = build_method("kd+adm", ms, roles=ROLES, num_classes=7, preset="imagenet").double()
    x, y = batch()
    out = m(run(ms, m.trainable, x.double()), y)
    torch.testing.assert_close(out.terms["adm/1"], 0.1 * out.terms["co/1"])


def test_offline_role_rule_is_one_check_for_build_method_and_the_classes():
    """The rule lives in OfflineMethod.check_roles; build_method applies it before building
    anything, a direct construction gets the same message (naming the roles)."""
    bad = ("teacher", "teacher", "student")
    with pytest.raises(ValueError, match=r"kd: offline distillation needs exactly one \(frozen\) teacher.*"
                                         r"\('teacher', 'teacher', 'student'\)"):
        build_method("kd", [FakeNet(), FakeNet(), FakeNet()], roles=bad, num_classes=7)
    for cls in (KD, DKD):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: offline distillation needs exactly one"):
            cls(bad, 7)
    with pytest.raises(ValueError, match=r"FitNet: offline distillation needs exactly one"):
        FitNet(("student", "student"), 7, [FakeNet(), FakeNet()])
    assert KD(("Student", "TEACHER"), 7).trainable == (True, False)  # normalised once
