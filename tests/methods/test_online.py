"""Online methods against hand-written formulas on fixed random logits and features."""
import math

import pytest
import torch
import torch.nn as nn

from kdengine.losses import ADMLoss, DMLLoss
from kdengine.methods import build_method, kdcl_ensemble, switokd_switch
from kdengine.models.base import ModelOutput

from .fakes import FakeNet, leaves, random_outputs

T_CH, S_CH = (4, 8, 16), (4, 8, 8)


def ce(z, y):
    return -torch.log_softmax(z, 1)[torch.arange(len(y)), y].mean()


def kl(p, z, tau=1.0):
    """tau^2 * mean_b sum_c p (log p - log softmax(z / tau)), p a constant."""
    p = p.detach()
    return tau**2 * (torch.xlogy(p, p) - p * torch.log_softmax(z / tau, 1)).sum(1).mean()


def sm(z, tau=1.0):
    return torch.softmax(z.detach() / tau, 1)


def logit_outputs(n, b=5, k=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [ModelOutput((2 * torch.randn(b, k, generator=g, dtype=torch.float64)).requires_grad_(), [])
            for _ in range(n)]


def blanks(n):
    return [nn.Module() for _ in range(n)]


def target(b=5, k=7, seed=4):
    return torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed))


def grad(total, x):
    (g,) = torch.autograd.grad(total, [x], retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def roles_of(spec):
    return {"1T1S": ("teacher", "student"), "1T2S": ("teacher", "student", "student"),
            "2T1S": ("teacher", "teacher", "student")}[spec]


# ----------------------------------------------------------------------------- vanilla / DML


def test_vanilla_is_the_sum_of_cross_entropies():
    outs, y = logit_outputs(3), target()
    m = build_method("vanilla", blanks(3), roles=roles_of("1T2S"), num_classes=7)
    out = m(outs, y)
    torch.testing.assert_close(out.total, sum(ce(o.logits, y) for o in outs))
    assert sorted(out.terms) == ["ce/0", "ce/1", "ce/2"]


@pytest.mark.parametrize("spec", ["1T1S", "1T2S"])
def test_dml_equals_eq4_and_dmlloss(spec):
    roles = roles_of(spec)
    n = len(roles)
    outs, y = logit_outputs(n), target()
    m = build_method("dml", blanks(n), roles=roles, num_classes=7, dml={"weight": 0.5}, temperature=2.0)
    out = m(outs, y)
    z = [o.logits for o in outs]
    hand = sum(ce(z[i], y) + 0.5 * sum(kl(sm(z[j], 2.0), z[i], 2.0) for j in range(n) if j != i) / (n - 1)
               for i in range(n))
    torch.testing.assert_close(out.total, hand)
    torch.testing.assert_close(out.total, DMLLoss(0.5, 2.0)(z, y))
    # the other models' predictions are detached targets: model 0's gradient is its own loss's
    own = ce(z[0], y) + 0.5 * sum(kl(sm(z[j], 2.0), z[0], 2.0) for j in range(1, n)) / (n - 1)
    torch.testing.assert_close(grad(out.total, z[0]), grad(own, z[0]))


def _stock_adm(models, method_adm, pair_index, **kw):
    """A plain ADMLoss with the same heads, weights and connector parameters as one pair."""
    ours = method_adm.losses[pair_index]
    t, s = method_adm.pairs[pair_index]
    stock = ADMLoss(models[s].head, models[t].head, ours.alpha, ours.beta, ours.gamma, ours.co, ours.di,
                    student_channels=kw["sc"], teacher_channels=kw["tc"]).double()
    stock.load_state_dict(ours.state_dict())
    return stock


def _models(roles, k=7):
    return [FakeNet(T_CH if r == "teacher" else S_CH, num_classes=k).double() for r in roles]


@pytest.mark.parametrize("spec", ["1T1S", "1T2S", "2T1S"])
def test_dml_adm_equals_dmlloss_plus_admloss_per_pair(spec):
    """Eq. 10, and Sec. 5.6 / Table 11 for three models: DML among all, ADM per teacher->student."""
    roles = roles_of(spec)
    models = _models(roles)
    m = build_method("dml+adm", models, roles=roles, num_classes=7).double()
    teachers = [i for i, r in enumerate(roles) if r == "teacher"]
    students = [i for i, r in enumerate(roles) if r == "student"]
    assert m.adm.pairs == [(t, s) for t in teachers for s in students]
    outs = random_outputs([T_CH if r == "teacher" else S_CH for r in roles], num_classes=7)
    y = target(4)
    out = m(outs, y)
    stocks = [_stock_adm(models, m.adm, i, sc=S_CH, tc=T_CH) for i in range(len(m.adm.pairs))]
    want = DMLLoss()([o.logits for o in outs], y) + sum(
        st([*outs[s].features], [*outs[t].features], y) for st, (t, s) in zip(stocks, m.adm.pairs))
    torch.testing.assert_close(out.total, want)
    params = [p for st in stocks for p in st.parameters()]
    ours = [p for mod in m.adm.losses for p in mod.parameters()]
    for a, b in zip(torch.autograd.grad(out.total, leaves(outs) + ours, allow_unused=True),
                    torch.autograd.grad(want, leaves(outs) + params, allow_unused=True)):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            torch.testing.assert_close(a, b)
    # per-model bookkeeping: the teacher's ADM term is beta * its L_di over its pairs
    for t in teachers:  # di/t already sums the teacher's pairs (two in 1T2S)
        torch.testing.assert_close(out.terms[f"adm/{t}"], 0.01 * out.terms[f"di/{t}"])
    for s in students:
        torch.testing.assert_close(out.terms[f"adm/{s}"], 0.01 * out.terms[f"co/{s}"] + out.terms[f"feat/{s}"])


# ----------------------------------------------------------------------------- KDCL


def _minlogit_by_hand(zs, y):
    out = torch.empty_like(zs[0])
    for b in range(len(y)):
        shifted = torch.stack([z[b] - z[b, y[b]] for z in zs])
        out[b] = shifted.min(0).values
    return out.detach()


@pytest.mark.parametrize("ensemble", ["minlogit", "mean"])
@pytest.mark.parametrize("spec", ["1T1S", "2T1S"])
def test_kdcl_equals_ce_plus_kl_to_the_ensemble(ensemble, spec):
    roles = roles_of(spec)
    n = len(roles)
    outs, y = logit_outputs(n), target()
    m = build_method("kdcl", blanks(n), roles=roles, num_classes=7, kdcl={"ensemble": ensemble}, temperature=3.0)
    out = m(outs, y)
    z = [o.logits for o in outs]
    z_e = _minlogit_by_hand(z, y) if ensemble == "minlogit" else torch.stack(z).mean(0).detach()
    torch.testing.assert_close(kdcl_ensemble(z, y, ensemble), z_e)
    p_e = sm(z_e, 3.0)
    torch.testing.assert_close(out.total, sum(ce(zi, y) + kl(p_e, zi, 3.0) for zi in z))
    for zi in z:  # the ensemble is a detached target
        torch.testing.assert_close(grad(out.total, zi), grad(ce(zi, y) + kl(p_e, zi, 3.0), zi))
    if ensemble == "minlogit":  # the target class sits at 0, every other class at most its peers'
        assert torch.all(z_e.gather(1, y.view(-1, 1)) == 0)


# ----------------------------------------------------------------------------- SwitOKD
# Three classes, one sample, label 0. Teacher p_t = (.8, .1, .1): d_t = 0.4. A student
# p_s = (.5, x, .5 - x) has d_s = 1, so the threshold is 1 - exp(-0.4 / 1.4) * 0.4, and for
# x > 0.4 the gap is 0.3 + (x - 0.1) + (x - 0.4) = 2x - 0.2: expert mode iff x > x*.
THRESH = 1.0 - math.exp(-0.4 / 1.4) * 0.4
X_STAR = (THRESH + 0.2) / 2
P_T = (0.8, 0.1, 0.1)
WORSE_T = (0.3, 0.35, 0.35)  # worse than the student (d_t = 1.4 > d_s = 1): never expert


def crafted(*probs):
    return [ModelOutput(torch.tensor([p], dtype=torch.float64).log().requires_grad_(), []) for p in probs]


def student(x):
    return (0.5, x, 0.5 - x)


Y1 = torch.tensor([0])


@pytest.mark.parametrize("side", [-1, 1], ids=["below", "above"])
def test_switch_flips_at_the_adaptive_threshold(side):
    x = X_STAR + side * 0.004
    t, s = crafted(P_T, student(x))
    expert, gap, threshold = switokd_switch(t.logits, s.logits, Y1)
    torch.testing.assert_close(threshold, torch.tensor(THRESH, dtype=threshold.dtype))
    torch.testing.assert_close(gap, torch.tensor(2 * x - 0.2, dtype=gap.dtype))
    assert bool(expert) == (side > 0)
    # a teacher worse than its student keeps learning, however large the gap
    t2, s2 = crafted(WORSE_T, student(x))
    e2, g2, th2 = switokd_switch(t2.logits, s2.logits, Y1)
    assert g2 > th2 and not bool(e2)


@pytest.mark.parametrize("side", [-1, 1], ids=["learning", "expert"])
def test_switokd_masks_the_teacher_on_the_device(side):
    outs = crafted(P_T, student(X_STAR + side * 0.004))
    m = build_method("switokd", blanks(2), roles=("teacher", "student"), num_classes=3)
    out = m(outs, Y1)
    zt, zs = outs[0].logits, outs[1].logits
    learn = 1.0 if side < 0 else 0.0
    student_loss = ce(zs, Y1) + kl(sm(zt), zs)
    teacher_loss = ce(zt, Y1) + kl(sm(zs), zt)
    torch.testing.assert_close(out.total, student_loss + learn * teacher_loss)
    assert out.terms["switch/0"].item() == learn
    assert m.step_gates().tolist() == [learn, 1.0]
    g_t = grad(out.total, zt)
    assert (g_t.abs().max() > 0) == bool(learn)
    torch.testing.assert_close(grad(out.total, zs), grad(student_loss, zs))


def test_switokd_1t2s_switches_each_pair():
    """SwitOKD's 1T2S: the teacher's KL from each student follows that pair's mode; its CE stops
    only when it is in expert mode against both students. Students learn from everyone."""
    roles = roles_of("1T2S")
    m = build_method("switokd", blanks(3), roles=roles, num_classes=3)
    outs = crafted(P_T, student(0.49), student(0.25))  # expert vs student 1, learning vs student 2
    out = m(outs, Y1)
    z = [o.logits for o in outs]
    assert out.terms["gap/0-1"] > out.terms["threshold/0-1"] > out.terms["gap/0-2"]
    hand = (ce(z[0], Y1) + (0 * kl(sm(z[1]), z[0]) + kl(sm(z[2]), z[0])) / 2
            + sum(ce(z[i], Y1) + sum(kl(sm(z[j]), z[i]) for j in range(3) if j != i) / 2 for i in (1, 2)))
    torch.testing.assert_close(out.total, hand)
    assert out.terms["switch/0"].item() == 1.0 and m.step_gates().tolist() == [1.0, 1.0, 1.0]
    outs = crafted(P_T, student(0.49), student(0.48))  # expert against both: fully paused
    out = m(outs, Y1)
    z = [o.logits for o in outs]
    assert out.terms["switch/0"].item() == 0.0 and m.step_gates().tolist() == [0.0, 1.0, 1.0]
    assert grad(out.total, z[0]).abs().max() == 0
    hand = sum(ce(z[i], Y1) + sum(kl(sm(z[j]), z[i]) for j in range(3) if j != i) / 2 for i in (1, 2))
    torch.testing.assert_close(out.total, hand)


def test_switokd_2t1s_pauses_each_teacher_on_its_own():
    m = build_method("switokd", blanks(3), roles=roles_of("2T1S"), num_classes=3)
    outs = crafted(P_T, WORSE_T, student(0.49))  # teacher 0 expert, teacher 1 learning
    out = m(outs, Y1)
    z = [o.logits for o in outs]
    hand = (ce(z[1], Y1) + (kl(sm(z[0]), z[1]) + kl(sm(z[2]), z[1])) / 2
            + ce(z[2], Y1) + (kl(sm(z[0]), z[2]) + kl(sm(z[1]), z[2])) / 2)
    torch.testing.assert_close(out.total, hand)
    assert m.step_gates().tolist() == [0.0, 1.0, 1.0]
    assert [out.terms["switch/0"].item(), out.terms["switch/1"].item()] == [0.0, 1.0]
    assert grad(out.total, z[0]).abs().max() == 0 and grad(out.total, z[1]).abs().max() > 0


@pytest.mark.parametrize("side", [-1, 1], ids=["learning", "expert"])
def test_switokd_adm_masks_the_teachers_divergence_loss(side):
    models = _models(("teacher", "student"), k=3)
    m = build_method("switokd+adm", models, roles=("teacher", "student"), num_classes=3).double()
    feats = random_outputs([T_CH, S_CH], b=1, num_classes=3)
    logits = crafted(P_T, student(X_STAR + side * 0.004))
    outs = [ModelOutput(z.logits, f.features) for z, f in zip(logits, feats)]
    out = m(outs, Y1)
    learn = 1.0 if side < 0 else 0.0
    torch.testing.assert_close(out.terms["adm/0"], learn * 0.01 * out.terms["di/0"])
    assert out.terms["di/0"] > 0
    teacher_leaves = [outs[0].logits, *outs[0].features, *models[0].head.parameters()]
    gs = torch.autograd.grad(out.total, teacher_leaves, allow_unused=True)
    moved = any(g is not None and g.abs().max() > 0 for g in gs)
    assert moved == bool(learn)
    student_leaves = [outs[1].logits, outs[1].features[-1], *models[1].head.parameters()]
    assert all(g.abs().max() > 0 for g in torch.autograd.grad(out.total, student_leaves))


def test_switokd_traces_without_graph_breaks():
    """No host syncs (.item(), Python branches on tensor values) in the switch: dynamo traces the
    whole forward as one graph, which is what CUDA-graph capture needs too."""
    m = build_method("switokd", blanks(2), roles=("teacher", "student"), num_classes=3)
    compiled = torch.compile(lambda o, y: m(o, y), backend="eager", fullgraph=True)
    for side, learn in [(1, 0.0), (-1, 1.0)]:  # one trace serves both modes
        outs = crafted(P_T, student(X_STAR + side * 0.004))
        out = compiled(outs, Y1)
        torch.testing.assert_close(out.total, m(outs, Y1).total)
        assert out.terms["switch/0"].item() == learn and m.step_gates()[0].item() == learn


@pytest.mark.parametrize("name", ["dml+adm", "kd+adm"])
def test_every_trainable_adm_parameter_gets_a_gradient(name):
    """Stage 0 has no connector (L_feat skips it, S uses the last stage), even where its channels
    differ; with gamma = 0 (offline defaults) the middle stages have none either and the last one,
    which only S reads and S carries no gradient, is frozen: no dead parameters for the optimizer."""
    t_ch, s_ch = (6, 8, 16), (4, 6, 8)  # every stage differs
    models = [FakeNet(t_ch).double(), FakeNet(s_ch).double()]
    m = build_method(name, models, roles=("teacher", "student"), num_classes=7).double()
    kinds = [type(c).__name__ for c in m.adm.losses[0].connectors]
    assert kinds == (["Identity", "Sequential", "Sequential"] if name == "dml+adm"
                     else ["Identity", "Identity", "Sequential"])
    outs = random_outputs([t_ch, s_ch], num_classes=7)
    m(outs, target(4)).total.backward()
    trainable = [p for p in m.adm.parameters() if p.requires_grad]
    assert trainable if name == "dml+adm" else not trainable
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
