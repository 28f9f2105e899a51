"""Offline methods (frozen teacher) against hand-written formulas."""
import pytest
import torch
import torch.nn.functional as F

from kdengine.losses import ADMLoss
from kdengine.methods import build_method, dkd_parts
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
    return [ModelOutput(t.logits.detach(), [f.detach() for f in t.features]), *outs[1:]]


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
