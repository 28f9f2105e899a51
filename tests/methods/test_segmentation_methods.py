"""The online methods on segmentation outputs (task="segmentation"): numbers against formulas
written out per pixel on fixed random SegOutputs, then every method on tiny real models."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdengine.losses import DenseADMLoss
from kdengine.methods import LOSS_KINDS, build_method, kdcl_ensemble, method_options, switokd_switch
from kdengine.models.segmentation import PixelClassifier, SegOutput, deeplabv3_resnet18, pspnet_resnet18

K = 5
IGNORE = 255
GRID, SIZE = 4, 16  # logits' grid and the label map's size
STAGES_T, STAGES_S = [(4, 8), (8, 4), (12, 4)], [(4, 8), (6, 4), (8, 4)]
ONLINE = ["vanilla", "dml", "kdcl", "switokd"]


class FakeSeg(nn.Module):
    """What the builder reads from a segmentation model: head, head_channels, stage_channels."""

    def __init__(self, stages, head_channels, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stage_channels = tuple(c for c, _ in stages)
        self.head_channels = head_channels
        self.classifier = PixelClassifier(head_channels, K).double()

    @property
    def head(self):
        return self.classifier


def seg_outputs(specs, b=2, seed=0):
    """Random SegOutput leaves (fp64) per (stages, head_channels) spec."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    return [SegOutput(leaf(b, K, GRID, GRID, scale=2.0), leaf(b, K, GRID, GRID, scale=2.0),
                      leaf(b, hc, GRID, GRID), [leaf(b, c, s, s) for c, s in stages]) for stages, hc in specs]


def label_map(b=2, seed=1, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (b, SIZE, SIZE), generator=g)
    return torch.where(torch.rand(b, SIZE, SIZE, generator=g) < ignore_frac, torch.full_like(y, IGNORE), y)


def at_grid(y):
    return y[:, :: SIZE // GRID, :: SIZE // GRID]  # nearest-downsampling by an integer factor


def ce_by_hand(out, y, aux_weight=0.4):
    def one(z):
        up = F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=True)
        valid = y != IGNORE
        nll = -torch.log_softmax(up, 1).gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
        return nll[valid].mean()

    return one(out.logits) + aux_weight * one(out.aux_logits)


def kl_by_hand(z_target, z, tau=1.0):
    """tau^2 * mean over every pixel of KL(softmax(z_target/tau) || softmax(z/tau)), target detached."""
    p = torch.softmax(z_target.detach() / tau, 1)
    return tau**2 * (p * (p.log() - torch.log_softmax(z / tau, 1))).sum(1).mean()


def grad(total, x):
    (g,) = torch.autograd.grad(total, [x], retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def specs(roles):
    return [(STAGES_T, 8) if r == "teacher" else (STAGES_S, 6) for r in roles]


def fakes(roles):
    return [FakeSeg(*spec, seed=i) for i, spec in enumerate(specs(roles))]


def build(name, roles=("teacher", "student"), models=None, **kw):
    models = models if models is not None else fakes(roles)
    return build_method(name, models, roles=roles, num_classes=K, task="segmentation", **kw).double(), models


# ----------------------------------------------------------------------------- formulas per pixel


def test_vanilla_is_the_segmentation_ce_with_the_aux_head():
    m, _ = build("vanilla")
    outs, y = seg_outputs(specs(("teacher", "student"))), label_map()
    out = m(outs, y)
    assert sorted(out.terms) == ["ce/0", "ce/1"]
    for i in range(2):
        torch.testing.assert_close(out.terms[f"ce/{i}"], ce_by_hand(outs[i], y))
    m, _ = build("vanilla", seg={"aux_weight": 0.0})
    torch.testing.assert_close(m(outs, y).terms["ce/0"], ce_by_hand(outs[0], y, 0.0))
    # outputs without an auxiliary head: the main term only
    bare = [o._replace(aux_logits=None) for o in outs]
    torch.testing.assert_close(build("vanilla")[0](bare, y).terms["ce/1"], ce_by_hand(outs[1], y, 0.0))


@pytest.mark.parametrize("roles", [("teacher", "student"), ("teacher", "student", "student")], ids=["1T1S", "1T2S"])
def test_dml_is_ce_plus_per_pixel_kl_both_ways(roles):
    m, _ = build("dml", roles, temperature=2.0)
    outs, y = seg_outputs(specs(roles)), label_map()
    out = m(outs, y)
    z = [o.logits for o in outs]
    n = len(z)
    for i in range(n):
        want_kl = sum(kl_by_hand(z[j], z[i], 2.0) for j in range(n) if j != i) / (n - 1)
        torch.testing.assert_close(out.terms[f"kl/{i}"], want_kl)
        torch.testing.assert_close(out.terms[f"ce/{i}"], ce_by_hand(outs[i], y))
    # kl_by_hand averages over every pixel, ignored ones too (the KL needs no label): the terms
    # differ from a mean over the labelled pixels only
    valid = at_grid(y) != IGNORE
    assert not valid.all()
    p = torch.softmax(z[1].detach(), 1)
    labelled_only = (p * (p.log() - torch.log_softmax(z[0], 1))).sum(1)[valid].mean()
    assert not torch.allclose(out.terms["kl/0"], labelled_only) or n > 2


def _minlogit_by_hand(zs, labels):
    """Per pixel: min over models of z - z[label]; ignored pixels gather class 0."""
    b, _, h, w = zs[0].shape
    out = torch.empty_like(zs[0])
    for i in range(b):
        for r in range(h):
            for c in range(w):
                k = int(labels[i, r, c])
                k = 0 if k == IGNORE else k
                out[i, :, r, c] = torch.stack([z[i, :, r, c] - z[i, k, r, c] for z in zs]).min(0).values
    return out.detach()


@pytest.mark.parametrize("ensemble", ["minlogit", "mean"])
def test_kdcl_ensemble_is_per_pixel(ensemble):
    m, _ = build("kdcl", kdcl={"ensemble": ensemble})
    outs, y = seg_outputs(specs(("teacher", "student"))), label_map(ignore_frac=0.5)
    out = m(outs, y)
    z = [o.logits for o in outs]
    grid = at_grid(y)
    z_e = _minlogit_by_hand(z, grid) if ensemble == "minlogit" else torch.stack(z).mean(0).detach()
    for i in range(2):
        torch.testing.assert_close(out.terms[f"kl/{i}"], kl_by_hand(z_e, z[i]))
        torch.testing.assert_close(out.terms[f"ce/{i}"], ce_by_hand(outs[i], y))
    if ensemble == "minlogit":  # the function itself, with the ignored pixels' class clamped
        torch.testing.assert_close(kdcl_ensemble(z, torch.where(grid == IGNORE, 0, grid)), z_e)


def boosted(outs, y, who):
    """``outs`` with model ``who``'s logits pushed towards the labels: a confident, right model
    (the teacher: SwitOKD's expert mode; the student: learning mode)."""
    grid = at_grid(y)
    boost = 8.0 * F.one_hot(torch.where(grid == IGNORE, 0, grid), K).permute(0, 3, 1, 2).double()
    outs = list(outs)
    outs[who] = outs[who]._replace(logits=(outs[who].logits.detach() + boost).requires_grad_())
    return outs


def _switch_by_hand(z_t, z_s, grid):
    valid = grid != IGNORE
    p_t, p_s = torch.softmax(z_t.detach(), 1), torch.softmax(z_s.detach(), 1)
    onehot = F.one_hot(torch.where(valid, grid, 0), K).permute(0, 3, 1, 2).double()

    def mean(d):
        return d[valid].mean()

    d_t, d_s = mean((p_t - onehot).abs().sum(1)), mean((p_s - onehot).abs().sum(1))
    gap = mean((p_t - p_s).abs().sum(1))
    return gap, d_s - torch.exp(-d_t / (d_s + d_t)) * d_t, bool((gap > d_s - torch.exp(-d_t / (d_s + d_t)) * d_t)
                                                              & (d_t < d_s))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_switokd_distances_are_per_pixel_over_the_labelled_pixels(seed):
    m, _ = build("switokd")
    outs, y = seg_outputs(specs(("teacher", "student")), seed=seed), label_map(seed=seed)
    outs = boosted(outs, y, seed % 2)  # a confident teacher or student: both modes over the seeds
    out = m(outs, y)
    gap, threshold, expert = _switch_by_hand(outs[0].logits, outs[1].logits, at_grid(y))
    torch.testing.assert_close(out.terms["gap/0-1"], gap)
    torch.testing.assert_close(out.terms["threshold/0-1"], threshold)
    learn = 0.0 if expert else 1.0
    assert out.terms["switch/0"].item() == learn and m.step_gates().tolist() == [learn, 1.0]
    z_t, z_s = outs[0].logits, outs[1].logits
    want = ce_by_hand(outs[1], y) + kl_by_hand(z_t, z_s) + learn * (ce_by_hand(outs[0], y) + kl_by_hand(z_s, z_t))
    torch.testing.assert_close(out.total, want)
    # the logits at ignored pixels do not move the switch
    ignored = (at_grid(y) == IGNORE).unsqueeze(1)
    noisy = [o._replace(logits=torch.where(ignored, 10 * torch.randn_like(o.logits), o.logits)) for o in outs]
    out2 = m(noisy, y)
    for key in ("gap/0-1", "threshold/0-1", "switch/0"):
        torch.testing.assert_close(out2.terms[key], out.terms[key])


def test_switokd_reaches_both_modes_in_the_seed_sweep():
    modes = set()
    for seed in range(4):
        outs, y = seg_outputs(specs(("teacher", "student")), seed=seed), label_map(seed=seed)
        outs = boosted(outs, y, seed % 2)
        modes.add(_switch_by_hand(outs[0].logits, outs[1].logits, at_grid(y))[2])
    assert modes == {True, False}


def test_an_unlabelled_batch_is_finite_everywhere():
    for name in ["vanilla", "dml", "kdcl", "switokd", "dml+adm", "switokd+adm", "kdcl+adm"]:
        m, models = build(name)
        outs, y = seg_outputs(specs(("teacher", "student"))), torch.full((2, SIZE, SIZE), IGNORE)
        out = m(outs, y)
        assert torch.isfinite(out.total) and all(torch.isfinite(v) for v in out.terms.values()), name
        leaves = [t for o in outs for t in (o.logits, o.head_feature)]
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.total, leaves, allow_unused=True)
                   if g is not None)
        assert out.terms["ce/0"].item() == 0.0


def test_switch_function_masks_and_keeps_2d_behaviour():
    g = torch.Generator().manual_seed(4)
    z_t, z_s = torch.randn(3, K, generator=g), torch.randn(3, K, generator=g)
    y = torch.tensor([0, 3, 1])
    dense = switokd_switch(z_t.view(3, K, 1, 1), z_s.view(3, K, 1, 1), y.view(3, 1, 1))
    flat = switokd_switch(z_t, z_s, y)
    for a, b in zip(dense, flat):
        torch.testing.assert_close(a, b)
    masked = switokd_switch(z_t.t().unsqueeze(0), z_s.t().unsqueeze(0), y.view(1, 3),  # [1, K, 3]
                            valid=torch.tensor([[True, False, True]]))
    # the same as the two valid rows alone
    keep = [0, 2]
    for a, b in zip(masked, switokd_switch(z_t[keep], z_s[keep], y[keep])):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- +adm


@pytest.mark.parametrize("dense", ["region", "pixel"])
@pytest.mark.parametrize("roles", [("teacher", "student"), ("teacher", "student", "student"),
                                   ("teacher", "teacher", "student")], ids=["1T1S", "1T2S", "2T1S"])
def test_dml_adm_adds_dense_adm_per_pair(dense, roles):
    m, models = build("dml+adm", roles, adm={"dense": dense})
    assert m.task == "segmentation" and m.dense == dense and not m.needs_indices and not m.soft_targets
    outs, y = seg_outputs(specs(roles)), label_map()
    out = m(outs, y)
    base, _ = build("dml", roles)
    want_base = base(outs, y)
    alpha, beta, gamma = 0.2, 0.6, 0.01  # the segmentation preset
    teachers = [i for i, r in enumerate(roles) if r == "teacher"]
    students = [i for i, r in enumerate(roles) if r == "student"]
    assert m.adm.pairs == [(t, s) for t in teachers for s in students]
    co, di, feat = {}, {}, {}
    for (t, s), ours in zip(m.adm.pairs, m.adm.losses):
        assert isinstance(ours, DenseADMLoss) and ours.dense == dense
        stock = DenseADMLoss(models[s].head, models[t].head, alpha, beta, gamma, num_classes=K, dense=dense,
                             student_channels=models[s].stage_channels, teacher_channels=models[t].stage_channels,
                             student_head_channels=6, teacher_head_channels=8).double()
        stock.load_state_dict(ours.state_dict())
        c, d, f = stock.parts(outs[s], outs[t], y)
        co[s], feat[s] = co.get(s, 0) + c, feat.get(s, 0) + f
        di[t] = di.get(t, 0) + d
    for s in students:
        torch.testing.assert_close(out.terms[f"co/{s}"], co[s])
        torch.testing.assert_close(out.terms[f"feat/{s}"], feat[s])
        torch.testing.assert_close(out.terms[f"adm/{s}"], alpha * co[s] + gamma * feat[s])
    for t in teachers:
        torch.testing.assert_close(out.terms[f"di/{t}"], di[t])
        torch.testing.assert_close(out.terms[f"adm/{t}"], beta * di[t])
    torch.testing.assert_close(out.total, want_base.total + sum(out.terms[f"adm/{i}"] for i in range(len(roles))))


@pytest.mark.parametrize("side", ["learning", "expert"])
def test_switokd_adm_masks_the_teachers_divergence_term(side):
    m, _ = build("switokd+adm")
    outs, y = seg_outputs(specs(("teacher", "student")), seed=1), label_map(seed=1)
    outs = boosted(outs, y, 0 if side == "expert" else 1)
    out = m(outs, y)
    learn = out.terms["switch/0"].item()
    assert learn == (1.0 if side == "learning" else 0.0)
    torch.testing.assert_close(out.terms["adm/0"], learn * 0.6 * out.terms["di/0"])
    assert out.terms["di/0"] > 0


# ----------------------------------------------------------------------------- checks and options


def test_bad_shapes_give_one_line_errors():
    m, _ = build("dml+adm")
    outs, y = seg_outputs(specs(("teacher", "student"))), label_map()

    def raises(match, outputs=outs, target=y):
        with pytest.raises(ValueError, match=match) as err:
            m(outputs, target)
        assert "\n" not in str(err.value)

    flat = [o._replace(logits=o.logits.mean((2, 3))) for o in outs]
    raises(r"DML: model 0 logits must be \[B, 5, h, w\] \(segmentation\), got \(2, 5\)", flat)
    raises(r"model 1 logits \(2, 5, 2, 2\) differ from model 0's \(2, 5, 4, 4\)",
           [outs[0], outs[1]._replace(logits=torch.randn(2, K, 2, 2))])
    raises(r"model 0 aux_logits must be \[B, 5, h, w\] with B = 2, got \(2, 3, 4, 4\)",
           [outs[0]._replace(aux_logits=torch.randn(2, 3, 4, 4)), outs[1]])
    raises(r"target must be an integer label map \[B, H, W\] with B = 2, got \(2,\) torch.int64",
           target=torch.zeros(2, dtype=torch.long))
    raises(r"target must be an integer label map .* got \(3, 16, 16\)", target=label_map(b=3))
    raises(r"target must be an integer label map .* torch.float32", target=y.float())


def _raises(match, name="dml", task="segmentation", models=None, **kw):
    models = models if models is not None else fakes(("teacher", "student"))
    with pytest.raises(ValueError, match=match) as err:
        build_method(name, models, roles=("teacher", "student"), num_classes=K, task=task, **kw)
    assert "\n" not in str(err.value)


def test_builder_options_and_errors():
    supported = "dml, dml\\+adm, kdcl, kdcl\\+adm, switokd, switokd\\+adm, vanilla, vanilla\\+adm"
    _raises(rf"method 'kd' does not support task='segmentation'; supported: {supported}", name="kd")
    _raises(r"method 'fitnet\+adm' does not support task='segmentation'", name="fitnet+adm")
    _raises(r"method 'pat' does not support task='segmentation'", name="pat")
    _raises(r"task must be one of \('classification', 'segmentation'\), got 'detection'", task="detection")
    _raises(r"option 'seg' applies to task='segmentation' only", task="classification", seg={"aux_weight": 0.4})
    _raises(r"adm option 'dense' applies to task='segmentation' only", name="dml+adm", task="classification",
            adm={"dense": "pixel"})
    _raises(r"adm dense must be one of \('region', 'pixel'\), got 'patch'", name="dml+adm", adm={"dense": "patch"})
    _raises(r"adm co and di must be 'ce' for task='segmentation'", name="dml+adm", adm={"di": "kd"})
    _raises(r"unknown adm option\(s\) \['delta_start'\]", name="dml+adm", adm={"delta_start": 0.1})
    _raises(r"preset must be one of \('segmentation',\) for task='segmentation', got 'cifar'", preset="cifar")
    _raises(r"unknown seg option\(s\) \['aux'\]; valid: align_corners, aux_weight, ignore_index", seg={"aux": 1})
    _raises(r"seg aux_weight must be a number >= 0, got -1", seg={"aux_weight": -1})
    _raises(r"seg align_corners must be true or false, got 'yes'", seg={"align_corners": "yes"})
    _raises(r"seg ignore_index must be an int, got 2.5", seg={"ignore_index": 2.5})
    plain = [FakeSeg(STAGES_T, 8), FakeSeg(STAGES_S, 6)]
    del plain[1].head_channels
    _raises(r"model 1 \(FakeSeg\) has no `head_channels`, which dense ADM needs", name="dml+adm", models=plain)


def test_segmentation_defaults():
    o = method_options("dml+adm", task="segmentation")
    assert o["preset"] == "segmentation"
    assert o["dml"] == {"weight": 1.0, "temperature": 1.0}
    assert o["seg"] == {"aux_weight": 0.4, "ignore_index": 255, "align_corners": True}
    adm = o["adm"]
    assert (adm["alpha"], adm["beta"], adm["gamma"], adm["dense"]) == (0.2, 0.6, 0.01, "region")
    assert "seg" not in method_options("dml+adm") and "dense" not in method_options("dml+adm")["adm"]
    o = method_options("kdcl", task="segmentation", preset="segmentation", temperature=2.0,
                       seg={"ignore_index": 0})
    assert o["kdcl"]["temperature"] == 2.0 and o["seg"]["ignore_index"] == 0 and "adm" not in o
    m, _ = build("vanilla", seg={"aux_weight": 0.2, "align_corners": False})
    assert (m.task, m.dense, m.seg.aux_weight, m.seg.align_corners, m.seg.ignore_index) == (
        "segmentation", None, 0.2, False, 255)
    c = build_method("dml", [nn.Module(), nn.Module()], roles=("teacher", "student"), num_classes=3)
    assert (c.task, c.dense, c.seg) == ("classification", None, None)


def test_a_uint8_label_map_gives_the_same_numbers():
    m, _ = build("switokd+adm")
    outs, y = seg_outputs(specs(("teacher", "student"))), label_map()
    a, b = m(outs, y), m(outs, y.to(torch.uint8))
    torch.testing.assert_close(a.total, b.total)


def test_a_custom_ignore_index_reaches_every_term():
    """ignore_index 0 (e.g. a background-as-void dataset): pixels labelled 0 count nowhere."""
    m, _ = build("switokd+adm", seg={"ignore_index": 0})
    # eval: the head connector's BN uses running statistics (in train mode its batch statistics
    # include every pixel, which DenseADMLoss documents)
    m.eval()
    outs = seg_outputs(specs(("teacher", "student")))
    y = label_map(ignore_frac=0.0)
    out = m(outs, y)
    ignored = (at_grid(y) == 0).unsqueeze(1)
    assert ignored.any()
    noisy = [o._replace(logits=torch.where(ignored, 10 * torch.randn_like(o.logits), o.logits),
                        head_feature=torch.where(ignored, torch.randn_like(o.head_feature), o.head_feature))
             for o in outs]
    out2 = m(noisy, y)
    for key in ("gap/0-1", "threshold/0-1", "co/1", "di/0"):
        torch.testing.assert_close(out2.terms[key], out.terms[key])


# ----------------------------------------------------------------------------- tiny real models


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return [deeplabv3_resnet18(num_classes=K), pspnet_resnet18(num_classes=K)]


SEG_NAMES = [(n, None) for n in ONLINE] + [(f"{n}+adm", d) for n in ONLINE for d in ("region", "pixel")]


@pytest.mark.parametrize("name, dense", SEG_NAMES, ids=[f"{n}-{d}" if d else n for n, d in SEG_NAMES])
def test_every_method_on_tiny_segmentation_models(tiny_models, name, dense):
    """DeepLabV3 R18 teacher (512-channel head feature), PSPNet R18 student (128: a head
    connector), 32 px, batch 2, 5 classes: finite total = the sum of the loss terms, the expected
    term names, and a backward that reaches both models (the student's classifier through L_co)."""
    models = tiny_models
    for mm in models:
        mm.zero_grad(set_to_none=True)
    options = {"adm": {"dense": dense}} if dense else {}
    m = build_method(name, models, roles=("teacher", "student"), num_classes=K, task="segmentation", **options)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.randint(0, K, (2, 32, 32), generator=g)
    y[:, :5] = IGNORE
    outs, out = m.forward_batch(models, x, y)
    assert outs[0].logits.shape == (2, K, 4, 4)
    base = name.split("+")[0]
    want = {"ce/0", "ce/1"}
    if base != "vanilla":
        want |= {"kl/0", "kl/1"}
    if base == "switokd":
        want |= {"switch/0", "gap/0-1", "threshold/0-1"}
    if dense:
        want |= {"co/1", "feat/1", "adm/1", "di/0", "adm/0"}
        assert m.dense == dense
        head_connector = m.adm.losses[0].head_connector
        assert isinstance(head_connector, nn.Sequential)  # 128 -> 512
        assert head_connector[0].weight.shape == (512, 128, 1, 1)
    assert set(out.terms) == want
    assert torch.isfinite(out.total) and all(torch.isfinite(v) for v in out.terms.values())
    torch.testing.assert_close(out.total.detach(),
                               sum(v for k, v in out.terms.items() if k.split("/")[0] in LOSS_KINDS))
    out.total.backward()
    # SwitOKD's teacher in expert mode is paused: no gradient at all
    teacher_learns = base != "switokd" or out.terms["switch/0"].item() == 1.0
    for mm, learns in zip(models, (teacher_learns, True)):
        moved = any(p.grad is not None and p.grad.abs().sum() > 0 for p in mm.parameters())
        assert moved == learns
    if dense == "region":  # L_co / L_di classify region pools with each model's own classifier
        assert models[1].classifier.weight.grad.abs().sum() > 0
        assert (models[0].classifier.weight.grad.abs().sum() > 0) == teacher_learns
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("name, dense", [("switokd+adm", "region"), ("kdcl+adm", "pixel")])
def test_segmentation_methods_trace_without_graph_breaks(name, dense):
    """No host sync or data-dependent shape in the per-pixel rules and dense ADM (what CUDA-graph
    capture needs): dynamo traces the whole forward as one graph."""
    m, _ = build(name, adm={"dense": dense})
    outs, y = seg_outputs(specs(("teacher", "student"))), label_map()
    compiled = torch.compile(lambda o, t: m(o, t), backend="eager", fullgraph=True)
    got = compiled(outs, y)
    want = m(outs, y)
    torch.testing.assert_close(got.total, want.total)
    assert set(got.terms) == set(want.terms)
