import pytest
import torch

from kdengine.ops import feature_mse, feature_mse_reference

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
