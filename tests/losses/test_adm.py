import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdengine.losses import ADMLoss, kd_delta
from kdengine.ops import available_impls

from .algorithm1 import ADM

STAGES = [(16, 8), (32, 4), (64, 2), (64, 2)]  # (channels, size) of four stages
NUM_CLASSES = 10


class Head(nn.Module):
    """The two attributes Algorithm 1 touches: avgpool and fc."""

    def __init__(self, channels, dtype):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, NUM_CLASSES).to(dtype)


def make_features(B, dtype, layout=torch.contiguous_format, stages=STAGES):
    def one():
        return [
            torch.randn(B, c, s, s, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
            for c, s in stages
        ]

    return one(), one()


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


IMPLS = ["reference"] + [i for i in ("cpu", "triton") if i in available_impls(torch.device("cpu"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("weights", [(0.01, 0.01, 1.0), (0.2, 0.6, 0.01), (1.0, 0.0, 0.0)])
def test_equals_algorithm1_in_fp64_with_gradients(impl, layout, weights):
    torch.manual_seed(1)
    stu, tea = Head(64, torch.float64), Head(64, torch.float64)
    feats_s, feats_t = make_features(4, torch.float64, layout)
    target = torch.randint(0, NUM_CLASSES, (4,))
    paper = ADM(tea, stu, *weights)(feats_s, feats_t, target)
    ours = ADMLoss(stu.fc, tea.fc, *weights, impl=impl)(feats_s, feats_t, target)
    torch.testing.assert_close(ours, paper, rtol=1e-12, atol=1e-14)
    leaves = feats_s + feats_t + list(stu.fc.parameters()) + list(tea.fc.parameters())
    for leaf, got, want in zip(leaves, grads(ours, leaves), grads(paper, leaves)):
        # None (gamma = 0 skips L_feat; unused heads) is the zero gradient.
        got = torch.zeros_like(leaf) if got is None else got
        want = torch.zeros_like(leaf) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_teacher_features_get_no_gradient_from_feat_loss():
    stu, tea = Head(64, torch.float32), Head(64, torch.float32)
    feats_s, feats_t = make_features(2, torch.float32)
    loss = ADMLoss(stu.fc, tea.fc, 0.0, 0.0, 1.0)(feats_s, feats_t, torch.zeros(2, dtype=torch.long))
    g = grads(loss, feats_t)
    assert all(x is None or x.abs().max() == 0 for x in g)


def _by_hand(stu, tea, feats_s, feats_t, target, prev, delta):
    """Eq. 11 and Eq. 12 written out from the paper: (L_co, L_di)."""
    fs, ft = feats_s[-1], feats_t[-1]
    sim = F.cosine_similarity(fs, ft, dim=1).detach()
    a_co = ((1 + sim) / (1 + sim.mean((1, 2), keepdim=True) + 1e-5)).unsqueeze(1)
    a_di = ((1 - sim) / ((1 - sim).mean((1, 2), keepdim=True) + 1e-5)).unsqueeze(1)
    z_s = stu.fc((a_co * F.relu(fs)).mean((2, 3)))
    z_t_co = tea.fc((a_co * F.relu(ft)).mean((2, 3))).detach()
    z_t = tea.fc((a_di * F.relu(ft)).mean((2, 3)))
    p_t_co = torch.softmax(z_t_co, 1)
    l_co = (p_t_co * (p_t_co.log() - torch.log_softmax(z_s, 1))).sum(1).mean()
    q = (1 - delta) * F.one_hot(target, NUM_CLASSES).double() + delta * prev
    l_di = (torch.xlogy(q, q) - q * torch.log_softmax(z_t, 1)).sum(1).mean()
    return l_co, l_di


def test_kd_variants_follow_eq_11_12():
    torch.manual_seed(2)
    stu, tea = Head(64, torch.float64), Head(64, torch.float64)
    feats_s, feats_t = make_features(3, torch.float64)
    target = torch.tensor([1, 2, 3])
    prev = torch.softmax(torch.randn(3, NUM_CLASSES, dtype=torch.float64), 1)
    delta = kd_delta(5, 11)
    adm = ADMLoss(stu.fc, tea.fc, 0.3, 0.7, 0.0, co="kd", di="kd")
    loss = adm(feats_s, feats_t, target, teacher_prev_probs=prev, delta=delta)
    l_co, l_di = _by_hand(stu, tea, feats_s, feats_t, target, prev, delta)
    torch.testing.assert_close(loss, 0.3 * l_co + 0.7 * l_di)
    assert kd_delta(0, 11) == pytest.approx(0.2) and kd_delta(10, 11) == pytest.approx(0.6)
    # per-sample delta [B, 1] (what ADMPairs passes: 0 where no previous prediction is stored)
    per_sample = torch.tensor([[0.3], [0.0], [0.5]], dtype=torch.float64)
    co, di, feat = adm.parts(feats_s, feats_t, target, prev, per_sample)
    want_co, want_di = _by_hand(stu, tea, feats_s, feats_t, target, prev, per_sample)
    torch.testing.assert_close(co, want_co)
    torch.testing.assert_close(di, want_di)
    assert feat is None  # gamma = 0: not computed
    # no previous prediction (the first epoch): the one-hot label, i.e. cross-entropy
    _, di, _ = adm.parts(feats_s, feats_t, target)
    _, want_di = _by_hand(stu, tea, feats_s, feats_t, target, prev, 0.0)
    torch.testing.assert_close(di, want_di)


@pytest.mark.parametrize("co", ["ce", "kd"])
@pytest.mark.parametrize("di", ["ce", "kd"])
def test_parts_weighted_are_forward(co, di):
    stu, tea = Head(64, torch.float64), Head(64, torch.float64)
    feats_s, feats_t = make_features(3, torch.float64)
    target = torch.tensor([0, 4, 9])
    prev = torch.softmax(torch.randn(3, NUM_CLASSES, dtype=torch.float64), 1) if di == "kd" else None
    delta = 0.4 if di == "kd" else None
    adm = ADMLoss(stu.fc, tea.fc, 0.3, 0.7, 0.2, co, di)
    c, d, f = adm.parts(feats_s, feats_t, target, prev, delta)
    torch.testing.assert_close(adm(feats_s, feats_t, target, teacher_prev_probs=prev, delta=delta),
                               0.3 * c + 0.7 * d + 0.2 * f)
    # each part against Algorithm 1 with the other weights at 0 (co/di "ce" only)
    if co == "ce" and di == "ce":
        for i, w in enumerate([(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]):
            torch.testing.assert_close((c, d, f)[i], ADM(tea, stu, *w)(feats_s, feats_t, target))


def test_a_zero_weight_part_is_not_computed_and_the_teacher_head_untouched():
    stu, tea = Head(64, torch.float32), Head(64, torch.float32)
    feats_s, feats_t = make_features(2, torch.float32)
    target = torch.tensor([1, 2])
    adm = ADMLoss(stu.fc, tea.fc, 1.0, 0.0, 0.0, di="kd")
    co, di, feat = adm.parts(feats_s, feats_t, target)
    assert di is None and feat is None
    co.backward()
    assert all(p.grad is None for p in tea.fc.parameters())
    assert all(p.grad is not None for p in stu.fc.parameters())
    # all weights 0: a zero loss
    assert ADMLoss(stu.fc, tea.fc, 0.0, 0.0, 0.0)(feats_s, feats_t, target).item() == 0.0


def test_connector_for_unequal_channels_and_sizes():
    stages_s = [(8, 8), (16, 8), (24, 4)]
    stages_t = [(16, 8), (32, 4), (48, 2)]
    stu, tea = Head(24, torch.float32), Head(48, torch.float32)
    feats_s = [torch.randn(2, c, s, s, requires_grad=True) for c, s in stages_s]
    feats_t = [torch.randn(2, c, s, s, requires_grad=True) for c, s in stages_t]
    adm = ADMLoss(stu.fc, tea.fc, 0.2, 0.6, 1.0,
                  student_channels=[c for c, _ in stages_s], teacher_channels=[c for c, _ in stages_t])
    loss = adm(feats_s, feats_t, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert feats_s[-1].grad is not None
    # Stage 0 is used neither by L_feat nor by S: no connector there (an Identity keeps the state-dict
    # keys of the others at their stage index). A connector (conv weight, BN weight and bias) on each
    # other unequal stage; the heads belong to the models and are not registered again.
    assert isinstance(adm.connectors[0], nn.Identity)
    assert sorted(adm.state_dict()) == sorted(
        f"connectors.{i}.{k}" for i in (1, 2)
        for k in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"))
    params = list(adm.parameters())
    assert len(params) == 2 * 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_without_feature_loss_only_the_last_connector_exists_and_it_is_frozen():
    """gamma = 0: S still maps the last stage, but S carries no gradient (Algorithm 1 detaches it),
    so that connector is frozen rather than given to an optimizer that could never move it."""
    stages_s, stages_t = [(8, 8), (16, 4), (24, 2)], [(16, 8), (32, 4), (48, 2)]
    stu, tea = Head(24, torch.float32), Head(48, torch.float32)
    adm = ADMLoss(stu.fc, tea.fc, 1.0, 0.0, 0.0,
                  student_channels=[c for c, _ in stages_s], teacher_channels=[c for c, _ in stages_t])
    assert [type(c).__name__ for c in adm.connectors] == ["Identity", "Identity", "Sequential"]
    assert all(not p.requires_grad for p in adm.parameters()) and len(list(adm.parameters())) == 3
    feats_s = [torch.randn(2, c, s, s, requires_grad=True) for c, s in stages_s]
    feats_t = [torch.randn(2, c, s, s) for c, s in stages_t]
    adm(feats_s, feats_t, torch.tensor([0, 1])).backward()
    assert feats_s[-1].grad.abs().sum() > 0


def test_bad_input():
    stu, tea = Head(64, torch.float32), Head(64, torch.float32)
    feats_s, feats_t = make_features(2, torch.float32)
    adm = ADMLoss(stu.fc, tea.fc, 1, 1, 1)
    with pytest.raises(ValueError, match="same stages"):
        adm(feats_s[:3], feats_t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target must be class indices \[B\] = \[2\]"):
        adm(feats_s, feats_t, torch.zeros(3, dtype=torch.long))
    bad_t = feats_t[:-1] + [torch.randn(2, 32, 2, 2)]
    with pytest.raises(ValueError, match="channels differ.*student_channels"):
        adm(feats_s, bad_t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="co and di must be one of"):
        ADMLoss(stu.fc, tea.fc, 1, 1, 1, co="mse")


def test_bad_previous_epoch_input():
    stu, tea = Head(64, torch.float32), Head(64, torch.float32)
    feats_s, feats_t = make_features(2, torch.float32)
    y = torch.zeros(2, dtype=torch.long)
    adm = ADMLoss(stu.fc, tea.fc, 1, 1, 1, di="kd")
    prev = torch.full((2, NUM_CLASSES), 1 / NUM_CLASSES)
    with pytest.raises(ValueError, match=r"teacher_prev_probs must be \(2, 10\), got \(2, 9\)"):
        adm(feats_s, feats_t, y, teacher_prev_probs=prev[:, :9], delta=0.3)
    with pytest.raises(ValueError, match="needs delta"):
        adm(feats_s, feats_t, y, teacher_prev_probs=prev)
    with pytest.raises(ValueError, match=r"delta must be .* \[B, 1\] = \[2, 1\], got \(2,\)"):
        adm.parts(feats_s, feats_t, y, prev, torch.full((2,), 0.3))
    for delta in (0.3, torch.tensor(0.3), torch.full((2, 1), 0.3)):
        assert torch.isfinite(adm(feats_s, feats_t, y, teacher_prev_probs=prev, delta=delta))


def test_heads_are_checked_up_front():
    from kdengine.models import create_model

    stu, tea = Head(64, torch.float32), Head(64, torch.float32)
    model = create_model("resnet8", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"student_head must be the model's classifier head.*CifarResNet"):
        ADMLoss(model, tea.fc, 1, 1, 1)
    with pytest.raises(ValueError, match=r"teacher_head must be the model's classifier head"):
        ADMLoss(stu.fc, model, 1, 1, 1)
    with pytest.raises(ValueError, match=r"teacher_head takes 64 features, but the last stage has 48"):
        ADMLoss(stu.fc, tea.fc, 1, 1, 1, student_channels=[16, 64], teacher_channels=[16, 48])
    ADMLoss(model.head, tea.fc, 1, 1, 1, student_channels=[16, 64], teacher_channels=[16, 64])
