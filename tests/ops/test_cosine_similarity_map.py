import pytest
import torch

from kdengine.ops import cosine_similarity_map, cosine_similarity_map_reference

from .helpers import DTYPES, assert_within_rule, impl_params, make_pair, require

SHAPES = [(2, 16, 5, 7), (1, 33, 4, 4), (3, 7, 1, 1), (2, 24, 40, 40)]


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_fp32(impl, device, layout, shape):
    require(impl, device)
    if impl == "triton" and device == "cpu" and shape[2] * shape[3] > 100:
        pytest.skip("large maps are too slow for the Triton interpreter")
    s, t = make_pair(shape, torch.float32, device, layout, zero_pixels=True)
    g = torch.randn(shape[0], shape[2], shape[3], device=device)
    a, b = s.detach().requires_grad_(), t.detach().requires_grad_()
    out = cosine_similarity_map(a, b, impl=impl)
    (out * g).sum().backward()
    ra, rb = s.detach().requires_grad_(), t.detach().requires_grad_()
    ref = cosine_similarity_map_reference(ra, rb)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_fp64(impl, device, layout):
    require(impl, device)
    s, t = make_pair((2, 5, 3, 4), torch.float64, device, layout)
    fn = lambda a, b: cosine_similarity_map(a, b, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s.requires_grad_(), t.requires_grad_()))


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_low_precision_error_rule(impl, device, dtype):
    require(impl, device)
    s, t = make_pair((2, 40, 6, 6), dtype, device, "channels_last")
    out = cosine_similarity_map(s, t, impl=impl)
    assert out.dtype == dtype
    assert_within_rule(out, cosine_similarity_map_reference(s, t),
                       cosine_similarity_map_reference(s.double(), t.double()), "sim")


@pytest.mark.parametrize("impl,device", impl_params())
def test_zero_vectors_give_zero_similarity(impl, device):
    require(impl, device)
    s, t = torch.zeros(1, 4, 2, 2, device=device), torch.randn(1, 4, 2, 2, device=device)
    assert cosine_similarity_map(s, t, impl=impl).abs().max().item() == 0.0


@pytest.mark.parametrize("impl,device", impl_params())
def test_opcheck(impl, device):
    require(impl, device)
    s, t = make_pair((2, 8, 3, 4), torch.float32, device)
    op = (torch.ops.kdengine.cosine_similarity_map_triton if impl == "triton"
          else torch.ops.kdengine.cosine_similarity_map)
    torch.library.opcheck(op.default, (s.requires_grad_(), t.requires_grad_(), 1e-8))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"same shape, got feat_s \(1, 2, 3, 3\) and feat_t \(1, 3, 3, 3\)"):
        cosine_similarity_map(torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"feat_t must be \[B, C, H, W\]"):
        cosine_similarity_map(torch.randn(1, 2, 3, 3), torch.randn(2, 3, 3))
