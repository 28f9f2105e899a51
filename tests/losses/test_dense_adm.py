"""Dense ADM (segmentation) and the dense generalisations of the KL / CE losses, against
independent computations: loops over images and classes, formulas written out."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdengine.losses import (
    ADMLoss,
    DenseADMLoss,
    kd_kl,
    labels_at,
    mutual_kl,
    seg_cross_entropy,
    soft_probs,
    stage_feature_loss,
)
from kdengine.models.segmentation import PixelClassifier, SegOutput
from kdengine.ops import available_impls

from .algorithm1 import ADM

K = 5
IGNORE = 255
IMPLS = ["reference"] + [i for i in ("cpu", "triton") if i in available_impls(torch.device("cpu"))]
STAGES = [(4, 8), (6, 8), (8, 4), (8, 4)]  # backbone stages (channels, size); the head grid is 4x4


def seg_output(head_channels, b=2, grid=4, stages=STAGES, seed=0, dtype=torch.float64):
    """A SegOutput of random leaves: logits [B, K, g, g], head feature [B, C, g, g], stages."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()

    feats = [leaf(b, c, s, s) for c, s in stages]
    return SegOutput(leaf(b, K, grid, grid, scale=2.0), None, leaf(b, head_channels, grid, grid), feats)


def label_map(b=2, size=8, seed=1, ignore_frac=0.25, classes=K):
    """Labels at twice the 4x4 grid (so that nearest-downsampling is ``[:, ::2, ::2]``), some ignored."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (b, size, size), generator=g)
    return torch.where(torch.rand(b, size, size, generator=g) < ignore_frac, torch.full_like(y, IGNORE), y)


def heads(cs, ct, seed=2):
    torch.manual_seed(seed)
    return PixelClassifier(cs, K).double(), PixelClassifier(ct, K).double()


def dense_loss(head_s, head_t, alpha=1.0, beta=1.0, gamma=1.0, dense="region", impl=None, cs=6, ct=6,
               stages=STAGES, **kw):
    ch = [c for c, _ in stages]
    return DenseADMLoss(head_s, head_t, alpha, beta, gamma, num_classes=K, dense=dense, impl=impl,
                        student_channels=ch, teacher_channels=ch, student_head_channels=cs,
                        teacher_head_channels=ct, **kw).double()


def maps_by_hand(fs, ft, valid, eps=1e-5):
    """Eq. 7-8 with the means over the valid pixels, cosine written out."""
    fs, ft = fs.detach(), ft.detach()
    sim = (fs * ft).sum(1) / (fs.norm(dim=1) * ft.norm(dim=1)).clamp_min(1e-8)
    v = valid.double()
    m = (sim * v).sum((1, 2), keepdim=True) / v.sum((1, 2), keepdim=True)
    return (1 + sim) / (1 + m + eps), (1 - sim) / (1 - m + eps)


def region_by_hand(head, feat, attn, grid):
    """Per image, per class present: pool, classify, CE; mean over the (image, class) pairs."""
    losses = []
    for b in range(feat.shape[0]):
        for k in range(K):
            mask = grid[b] == k
            if not mask.any():
                continue
            pooled = (attn[b][mask].unsqueeze(0) * F.relu(feat[b][:, mask])).sum(1) / mask.sum()
            losses.append(-torch.log_softmax(head(pooled), 0)[k])
    return torch.stack(losses).mean()


def pixel_by_hand(logits, attn, grid):
    valid = grid != IGNORE
    logp = torch.log_softmax(logits, 1)
    ce = -logp.gather(1, torch.where(valid, grid, 0).unsqueeze(1)).squeeze(1)
    w = attn * valid
    return (w * ce).sum() / w.sum()


def grads(loss, leaves):
    gs = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]


def feat_by_hand(feats_s, feats_t, connectors):
    n = len(feats_s)
    return sum(F.mse_loss(connectors[i](feats_s[i]), feats_t[i].detach()) / 2 ** (n - i) for i in range(1, n))


# ----------------------------------------------------------------------------- region / pixel forms


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head_channels", [(6, 6), (6, 10)], ids=["same", "connector"])
def test_region_form_equals_a_loop_over_images_and_classes(impl, head_channels):
    cs, ct = head_channels
    hs, ht = heads(cs, ct)
    loss = dense_loss(hs, ht, 0.3, 0.7, 0.2, impl=impl, cs=cs, ct=ct)
    out_s, out_t = seg_output(cs, seed=0), seg_output(ct, seed=1)
    y = label_map()
    co, di, feat = loss.parts(out_s, out_t, y)
    grid = y[:, ::2, ::2]
    assert (grid == IGNORE).any() and (grid != IGNORE).any()
    mapped = loss.head_connector(out_s.head_feature)  # train-mode BN: batch statistics, as in parts
    a_co, a_di = maps_by_hand(mapped, out_t.head_feature, grid != IGNORE)
    want_co = region_by_hand(hs, out_s.head_feature, a_co, grid)
    want_di = region_by_hand(ht, out_t.head_feature, a_di, grid)
    torch.testing.assert_close(co, want_co)
    torch.testing.assert_close(di, want_di)
    torch.testing.assert_close(feat, feat_by_hand(out_s.features, out_t.features, loss.connectors))
    torch.testing.assert_close(loss(out_s, out_t, y), 0.3 * co + 0.7 * di + 0.2 * feat)
    leaves = [out_s.head_feature, out_t.head_feature, *hs.parameters(), *ht.parameters()]
    for got, want in zip(grads(co + di, leaves), grads(want_co + want_di, leaves)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_pixel_form_is_the_attention_weighted_ce_over_valid_pixels(impl):
    hs, ht = heads(6, 6)
    loss = dense_loss(hs, ht, 1.0, 1.0, 0.0, dense="pixel", impl=impl)
    out_s, out_t = seg_output(6, seed=3), seg_output(6, seed=4)
    y = label_map(seed=5)
    co, di, feat = loss.parts(out_s, out_t, y)
    grid = y[:, ::2, ::2]
    a_co, a_di = maps_by_hand(out_s.head_feature, out_t.head_feature, grid != IGNORE)
    torch.testing.assert_close(co, pixel_by_hand(out_s.logits, a_co, grid))
    torch.testing.assert_close(di, pixel_by_hand(out_t.logits, a_di, grid))
    assert feat is None
    # with A = 1 the pixel form is the plain CE over the labelled pixels of the grid
    from kdengine.losses import pixel_ce

    torch.testing.assert_close(pixel_ce(out_s.logits, torch.ones(2, 4, 4, dtype=torch.float64), grid),
                               F.cross_entropy(out_s.logits, grid, ignore_index=IGNORE))


@pytest.mark.parametrize("impl", IMPLS)
def test_one_label_per_image_is_algorithm_1(impl):
    """No ignored pixel and one class covering each image: the region form is Algorithm 1's pooled
    CE (and ADMLoss's), L_feat is the same function as classification's, gradients alike."""
    cs = ct = 8
    hs, ht = heads(cs, ct, seed=7)
    loss = dense_loss(hs, ht, 1.0, 1.0, 1.0, impl=impl, cs=cs, ct=ct)
    out_s, out_t = seg_output(cs, b=3, seed=8), seg_output(ct, b=3, seed=9)
    target = torch.tensor([3, 0, 3])
    y = target.view(3, 1, 1).expand(3, 8, 8).contiguous()
    co, di, feat = loss.parts(out_s, out_t, y)

    class Model:  # the two attributes Algorithm 1 reads
        def __init__(self, fc):
            self.fc, self.avgpool = fc, nn.AdaptiveAvgPool2d(1)

    stu, tea = Model(hs), Model(ht)
    paper_co = ADM(tea, stu, 1.0, 0.0, 0.0).adm_loss(out_s.head_feature, out_t.head_feature, target)
    paper_di = ADM(tea, stu, 0.0, 1.0, 0.0).adm_loss(out_s.head_feature, out_t.head_feature, target)
    paper_feat = ADM(tea, stu, 0, 0, 1).feat_loss(out_s.features, out_t.features)
    torch.testing.assert_close(co, paper_co, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(di, paper_di, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(feat, paper_feat, rtol=1e-12, atol=1e-12)
    ours = ADMLoss(hs, ht, 1.0, 1.0, 0.0, impl=impl).parts([out_s.head_feature], [out_t.head_feature], target)
    torch.testing.assert_close(co, ours[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(di, ours[1], rtol=1e-12, atol=1e-12)
    leaves = [out_s.head_feature, out_t.head_feature, *out_s.features, *hs.parameters(), *ht.parameters()]
    for got, want in zip(grads(co + di + feat, leaves), grads(paper_co + paper_di + paper_feat, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_feat_loss_is_one_function_for_both_tasks():
    ch_s, ch_t = [4, 6, 8, 8], [4, 12, 16, 8]
    hs, ht = heads(6, 6)
    dense = DenseADMLoss(hs, ht, 0, 0, 1, num_classes=K, student_channels=ch_s, teacher_channels=ch_t).double()
    cls = ADMLoss(hs, ht, 0, 0, 1, student_channels=ch_s, teacher_channels=ch_t).double()
    cls.load_state_dict(dense.connectors.state_dict(prefix="connectors."), strict=False)
    out_s = seg_output(6, stages=[(c, s) for c, (_, s) in zip(ch_s, STAGES)], seed=10)
    out_t = seg_output(6, stages=[(c, s) for c, (_, s) in zip(ch_t, STAGES)], seed=11)
    _, _, feat = dense.parts(out_s, out_t, label_map())
    torch.testing.assert_close(feat, cls.feat_loss(out_s.features, out_t.features), rtol=0, atol=0)
    torch.testing.assert_close(feat, stage_feature_loss(out_s.features, out_t.features, dense.connectors))
    torch.testing.assert_close(feat, feat_by_hand(out_s.features, out_t.features, dense.connectors))
    assert isinstance(dense.connectors[0], nn.Identity) and isinstance(dense.connectors[3], nn.Identity)


# ----------------------------------------------------------------------------- gradients, ignored pixels


@pytest.mark.parametrize("dense", ["region", "pixel"])
def test_gradients_reach_only_their_side(dense):
    cs, ct = 6, 10
    hs, ht = heads(cs, ct)
    stages_t = [(c * 2, s) for c, s in STAGES]
    loss = DenseADMLoss(hs, ht, 1.0, 1.0, 1.0, num_classes=K, dense=dense,
                        student_channels=[c for c, _ in STAGES], teacher_channels=[c for c, _ in stages_t],
                        student_head_channels=cs, teacher_head_channels=ct).double()
    out_s, out_t = seg_output(cs, seed=0), seg_output(ct, seed=1, stages=stages_t)
    co, di, feat = loss.parts(out_s, out_t, label_map())
    own_s = [out_s.logits] if dense == "pixel" else [out_s.head_feature, *hs.parameters()]
    own_t = [out_t.logits] if dense == "pixel" else [out_t.head_feature, *ht.parameters()]
    student = [out_s.logits, out_s.head_feature, *out_s.features, *hs.parameters()]
    teacher = [out_t.logits, out_t.head_feature, *out_t.features, *ht.parameters()]
    connectors = [p for p in loss.connectors.parameters()]
    assert connectors and all(p.requires_grad for p in connectors)
    # the head connector only maps S, which is detached: frozen
    assert all(not p.requires_grad for p in loss.head_connector.parameters())
    assert len(list(loss.head_connector.parameters())) == 3

    def nonzero(loss_term, leaves):
        return [bool(g.abs().sum() > 0) for g in grads(loss_term, leaves)]

    assert all(nonzero(co, own_s)) and not any(nonzero(co, teacher + connectors))
    assert all(nonzero(di, own_t)) and not any(nonzero(di, student + connectors))
    assert all(nonzero(feat, out_s.features[1:] + connectors))
    assert not any(nonzero(feat, teacher + [out_s.features[0], out_s.head_feature, out_s.logits]))


@pytest.mark.parametrize("dense", ["region", "pixel"])
@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_pixels_change_nothing(dense, impl):
    hs, ht = heads(6, 6)
    loss = dense_loss(hs, ht, 1.0, 1.0, 0.0, dense=dense, impl=impl)
    out_s, out_t = seg_output(6, seed=0), seg_output(6, seed=1)
    y = label_map(ignore_frac=0.4, seed=3)
    ignored = (y[:, ::2, ::2] == IGNORE).unsqueeze(1)
    assert ignored.any()
    co, di, _ = loss.parts(out_s, out_t, y)

    def noisy(out, seed):
        g = torch.Generator().manual_seed(seed)

        def change(x):
            return torch.where(ignored, x + 5 * torch.randn(x.shape, generator=g, dtype=x.dtype), x)

        return out._replace(logits=change(out.logits), head_feature=change(out.head_feature))

    co2, di2, _ = loss.parts(noisy(out_s, 5), noisy(out_t, 6), y)
    torch.testing.assert_close(co2, co, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(di2, di, rtol=1e-12, atol=1e-12)
    # and they get no gradient
    g_s, g_t = grads(co + di, [out_s.head_feature if dense == "region" else out_s.logits,
                               out_t.head_feature if dense == "region" else out_t.logits])
    assert g_s.masked_select(ignored).abs().max() == 0 and g_t.masked_select(ignored).abs().max() == 0


@pytest.mark.parametrize("dense", ["region", "pixel"])
def test_an_unlabelled_batch_gives_zero_not_nan(dense):
    hs, ht = heads(6, 6)
    loss = dense_loss(hs, ht, dense=dense)
    out_s, out_t = seg_output(6), seg_output(6, seed=1)
    y = torch.full((2, 8, 8), IGNORE)
    co, di, feat = loss.parts(out_s, out_t, y)
    assert co.item() == 0.0 and di.item() == 0.0 and torch.isfinite(feat)
    for g in grads(co + di + feat, [out_s.head_feature, out_t.head_feature, out_s.logits, out_t.logits]):
        assert torch.isfinite(g).all()


def test_one_class_absent_from_one_image_is_left_out():
    """Classes absent from an image pool to zero and must not enter the mean."""
    hs, ht = heads(6, 6)
    loss = dense_loss(hs, ht, 1.0, 0.0, 0.0)
    out_s, out_t = seg_output(6), seg_output(6, seed=1)
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[1, :4] = 2  # image 0: class 0 only; image 1: classes 0 and 2
    co, _, _ = loss.parts(out_s, out_t, y)
    grid = y[:, ::2, ::2]
    a_co, _ = maps_by_hand(out_s.head_feature, out_t.head_feature, grid != IGNORE)
    torch.testing.assert_close(co, region_by_hand(hs, out_s.head_feature, a_co, grid))


def test_compiles_without_graph_breaks():
    """No host sync, no data-dependent shape: torch.compile(fullgraph=True) traces both forms."""
    hs, ht = heads(6, 10)
    for dense in ("region", "pixel"):
        loss = dense_loss(hs, ht, 0.2, 0.6, 0.01, dense=dense, cs=6, ct=10)
        out_s, out_t = seg_output(6), seg_output(10, seed=1)
        y = label_map()
        want = loss(out_s, out_t, y)
        got = torch.compile(loss, fullgraph=True, backend="eager")(out_s, out_t, y)
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_shapes():
    hs, ht = heads(6, 6)
    out_s, out_t = seg_output(6), seg_output(6, seed=1)
    loss = dense_loss(hs, ht)
    with pytest.raises(ValueError, match=r"labels must be an integer label map \[B, H, W\] with B = 2, got \(2, 8\)"):
        loss.parts(out_s, out_t, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be an integer label map.*torch.float32"):
        loss.parts(out_s, out_t, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"head features must be \[B, C, h, w\] with one B, h, w, got student "
                                         r"\(2, 6, 4, 4\) and teacher \(2, 6, 2, 2\)"):
        loss.parts(out_s, out_t._replace(head_feature=torch.randn(2, 6, 2, 2)), label_map())
    with pytest.raises(ValueError, match=r"head features' channels differ.*student_head_channels"):
        DenseADMLoss(hs, ht, 1, 1, 0, num_classes=K).parts(out_s, seg_output(10, seed=1), label_map())
    pixel = dense_loss(hs, ht, dense="pixel")
    with pytest.raises(ValueError, match=r"dense='pixel' needs the teacher's logits at the head feature's grid "
                                         r"\[B, K, h, w\] = \[2, 5, 4, 4\], got \(2, 5, 8, 8\)"):
        pixel.parts(out_s, out_t._replace(logits=torch.randn(2, K, 8, 8)), label_map())
    with pytest.raises(ValueError, match="same stages"):
        loss.parts(out_s, out_t._replace(features=out_t.features[:2]), label_map())
    with pytest.raises(ValueError, match=r"dense must be one of \('region', 'pixel'\), got 'patch'"):
        DenseADMLoss(hs, ht, 1, 1, 1, num_classes=K, dense="patch")
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1, got 0"):
        DenseADMLoss(hs, ht, 1, 1, 1, num_classes=0)
    with pytest.raises(ValueError, match=r"student_head takes 6 channels, but the head feature has 8"):
        DenseADMLoss(hs, ht, 1, 1, 1, num_classes=K, student_head_channels=8, teacher_head_channels=6)
    from kdengine.models import create_model

    with pytest.raises(ValueError, match=r"DenseADMLoss: teacher_head must be the model's classifier head"):
        DenseADMLoss(hs, create_model("resnet8", num_classes=K), 1, 1, 1, num_classes=K)


# ----------------------------------------------------------------------------- KL and CE, dense


def test_kd_kl_of_2d_logits_is_unchanged_to_the_bit():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 7, generator=g)
    p = torch.softmax(torch.randn(6, 7, generator=g), 1)
    for tau in (1.0, 4.0):
        want = F.kl_div(F.log_softmax(z / tau, dim=1), p, reduction="batchmean") * tau**2
        assert torch.equal(kd_kl(z, p, tau), want)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_dense_kl_is_the_mean_over_pixels_of_per_pixel_kl(tau):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, K, 3, 4, generator=g, dtype=torch.float64)
    q = torch.randn(2, K, 3, 4, generator=g, dtype=torch.float64)
    p = soft_probs(q, tau)
    per_pixel = (p * (p.log() - torch.log_softmax(z / tau, 1))).sum(1)  # [B, h, w]
    torch.testing.assert_close(kd_kl(z, p, tau), tau**2 * per_pixel.mean())
    # rows of the [B*h*w, K] flattening: the 2-D kd_kl
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, K)  # noqa: E731
    torch.testing.assert_close(kd_kl(z, p, tau), kd_kl(flat(z), flat(p), tau))
    # mutual_kl both ways on dense logits
    kls = mutual_kl([z, q], tau)
    torch.testing.assert_close(kls[0], kd_kl(z, soft_probs(q, tau), tau))
    torch.testing.assert_close(kls[1], kd_kl(q, soft_probs(z, tau), tau))


def test_labels_at_is_nearest():
    y = label_map(size=8)
    assert torch.equal(labels_at(y, (4, 4)), y[:, ::2, ::2])
    assert labels_at(y, (8, 8)) is y or torch.equal(labels_at(y, (8, 8)), y)
    y = torch.arange(33).view(1, 1, 33).expand(1, 5, 33) % 256
    assert labels_at(y, (1, 5))[0, 0].tolist() == [(i * 33) // 5 for i in range(5)]


@pytest.mark.parametrize("align_corners", [True, False])
def test_seg_cross_entropy_upsamples_and_ignores(align_corners):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, K, 4, 4, generator=g, dtype=torch.float64)
    aux = torch.randn(2, K, 4, 4, generator=g, dtype=torch.float64)
    y = label_map(size=13, seed=4)

    def ce(z):  # upsample, then CE averaged over the labelled pixels, written out
        up = F.interpolate(z, size=(13, 13), mode="bilinear", align_corners=align_corners)
        valid = y != IGNORE
        nll = -torch.log_softmax(up, 1).gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
        return nll[valid].mean()

    got = seg_cross_entropy(logits, y, aux, aux_weight=0.4, align_corners=align_corners)
    torch.testing.assert_close(got, ce(logits) + 0.4 * ce(aux))
    torch.testing.assert_close(seg_cross_entropy(logits, y, align_corners=align_corners), ce(logits))
    torch.testing.assert_close(seg_cross_entropy(logits, y, aux, aux_weight=0.0, align_corners=align_corners),
                               ce(logits))
    # default: CIRKD's align_corners=True
    if align_corners:
        torch.testing.assert_close(seg_cross_entropy(logits, y, aux), got)
    # nothing labelled: 0, not NaN
    z = logits.clone().requires_grad_()
    loss = seg_cross_entropy(z, torch.full_like(y, IGNORE), aux)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()
