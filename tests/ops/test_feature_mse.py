import pytest
import torch

from kdengine.ops import available_impls, feature_mse, feature_mse_reference

from .helpers import DTYPES, assert_within_rule, impl_params, make_pair, require

SHAPES = [(2, 16, 5, 7), (1, 33, 4, 4), (3, 7, 1, 1), (2, 24, 40, 40)]


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_fp32(impl, device, layout, shape):
    require(impl, device)
    s, t = make_pair(shape, torch.float32, device, layout)
    a, b = s.detach().requires_grad_(), t.detach().requires_grad_()
    out = feature_mse(a, b, impl=impl)
    (3.0 * out).backward()
    ra = s.detach().requires_grad_()
    ref = feature_mse_reference(ra, t)
    (3.0 * ref).backward()
    assert out.shape == () and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-5, atol=1e-8)
    assert b.grad is None, "feature_mse must not send a gradient into feat_t"


@pytest.mark.parametrize("impl,device", impl_params())
def test_gradcheck_fp64(impl, device):
    require(impl, device)
    s, t = make_pair((2, 5, 3, 4), torch.float64, device, "channels_last")
    assert torch.autograd.gradcheck(lambda a: feature_mse(a, t, impl=impl), (s.requires_grad_(),))


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_low_precision_error_rule(impl, device, dtype):
    require(impl, device)
    s, t = make_pair((2, 40, 6, 6), dtype, device)
    out = feature_mse(s, t, impl=impl)
    assert out.dtype == dtype
    assert_within_rule(out, feature_mse_reference(s, t), feature_mse_reference(s.double(), t.double()), "mse")


@pytest.mark.parametrize("impl,device", impl_params())
def test_any_rank_and_mixed_layouts(impl, device):
    require(impl, device)
    s, t = torch.randn(4, 17, 9, device=device), torch.randn(4, 17, 9, device=device)
    torch.testing.assert_close(feature_mse(s, t, impl=impl), feature_mse_reference(s, t))
    s4, t4 = make_pair((2, 6, 3, 5), torch.float32, device)
    t4 = t4.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(feature_mse(s4, t4, impl=impl), feature_mse_reference(s4, t4))


@pytest.mark.slow
def test_large_reduction_stays_accurate():
    """50M elements (an R34 stage-1 map at B=256): fp32 lanes + fp64 grain sums, no drift."""
    s = torch.randn(256, 64, 56, 56)
    t = s + 0.5
    torch.testing.assert_close(feature_mse(s, t), torch.tensor(0.25), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl,device", impl_params())
def test_opcheck(impl, device):
    require(impl, device)
    s, t = make_pair((2, 8, 3, 4), torch.float32, device)
    op = torch.ops.kdengine.feature_mse_triton if impl == "triton" else torch.ops.kdengine.feature_mse
    torch.library.opcheck(op.default, (s.requires_grad_(), t))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"same shape, got feat_s \(2, 3\) and feat_t \(3, 2\)"):
        feature_mse(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="feat_t must be float32"):
        feature_mse(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int32))


# ------------------------------------------------- grad_weight: the gradient written by the forward

needs_cpu = pytest.mark.skipif("cpu" not in available_impls(torch.device("cpu")), reason="extension not built")


def _loss_and_grad(s, t, weight, hint=None):
    a = s.detach().requires_grad_()
    out = feature_mse(a, t, impl="cpu", grad_weight=hint)
    (weight * out).backward()
    return out, a.grad, out.grad_fn


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_grad_weight_gives_the_same_bits(dtype, layout):
    s, t = make_pair((3, 16, 9, 7), dtype, "cpu", layout)
    weight = 0.01 / 4  # gamma / 2^(N-i) of ADM's ImageNet L_feat
    out, grad, fn = _loss_and_grad(s, t, weight, hint=weight)
    ref_out, ref_grad, ref_fn = _loss_and_grad(s, t, weight)
    assert "feature_mse_and_grad" in fn.name() and "feature_mse_and_grad" not in ref_fn.name()
    assert torch.equal(out, ref_out)
    assert torch.equal(grad, ref_grad)
    assert grad.stride() == ref_grad.stride()


@needs_cpu
def test_grad_weight_other_incoming_gradients_are_recomputed():
    s, t = make_pair((2, 8, 6, 6))
    _, grad, _ = _loss_and_grad(s, t, 3.0, hint=0.5)  # the hint is wrong: computed afresh
    _, ref, _ = _loss_and_grad(s, t, 3.0)
    assert torch.equal(grad, ref)
    # a retained graph's second backward adds the same gradient again
    a = s.detach().requires_grad_()
    out = 0.5 * feature_mse(a, t, impl="cpu", grad_weight=0.5)
    out.backward(retain_graph=True)
    out.backward()
    torch.testing.assert_close(a.grad, 2 * ref / 6.0, rtol=1e-6, atol=0)


@needs_cpu
def test_grad_weight_is_ignored_without_autograd():
    s, t = make_pair((2, 8, 6, 6))
    with torch.no_grad():
        out = feature_mse(s.requires_grad_(), t, impl="cpu", grad_weight=0.5)
    assert out.grad_fn is None
    assert torch.equal(out, feature_mse(s.detach(), t, impl="cpu"))
    assert feature_mse(s.detach(), t, impl="cpu", grad_weight=0.5).grad_fn is None


@needs_cpu
@pytest.mark.parametrize("hint", [None, 0.25])
def test_streamed_outputs_match_the_reference(hint):
    # 1.2M elements (4.8 MB): the gradient is written with streaming stores; the offset view and
    # the odd length take the unaligned head and the tail of each thread's range.
    base, other = torch.randn(1_200_003), torch.randn(1_200_003)
    s, t = base[1:], other[1:]
    a = s.clone().requires_grad_()
    out = feature_mse(a, t, impl="cpu", grad_weight=hint)
    (0.25 * out).backward()
    torch.testing.assert_close(a.grad, 0.25 * 2 * (s - t) / s.numel(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out, ((s.double() - t.double()) ** 2).mean().float(), rtol=1e-6, atol=0)


@needs_cpu
def test_feature_mse_and_grad_opcheck():
    s, t = make_pair((2, 8, 3, 4))
    torch.library.opcheck(torch.ops.kdengine._feature_mse_and_grad.default, (s.requires_grad_(), t, 0.5))
