import importlib.util

import pytest
import torch

from kdengine import ops
from kdengine.ops import adm_pool, adm_pool_reference

from .helpers import DTYPES, assert_within_rule, impl_params, make_pair, require

SHAPES = [
    (2, 16, 5, 7),
    (1, 33, 4, 4),  # B=1, C not a multiple of any vector width
    (3, 7, 1, 1),  # H=W=1
    (2, 24, 40, 40),  # HW spans many tiles
]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


def _reference_with_grads(s, t, weights):
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_()
    ps, pt = adm_pool_reference(s, t)
    ((ps * weights[0]).sum() + (pt * weights[1]).sum()).backward()
    return ps.detach(), pt.detach(), s.grad, t.grad


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_fp32_matches_reference(impl, device, layout, shape):
    require(impl, device)
    if impl == "triton" and device == "cpu" and shape[2] * shape[3] > 100:
        pytest.skip("large maps are too slow for the Triton interpreter")
    s, t = make_pair(shape, torch.float32, device, layout, zero_pixels=True)
    w = torch.randn(2, shape[0], shape[1], device=device)
    s_req, t_req = s.detach().requires_grad_(), t.detach().requires_grad_()
    ps, pt = adm_pool(s_req, t_req, impl=impl)
    ((ps * w[0]).sum() + (pt * w[1]).sum()).backward()
    rps, rpt, rgs, rgt = _reference_with_grads(s, t, w)
    torch.testing.assert_close(ps, rps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pt, rpt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_req.grad, rgs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t_req.grad, rgt, rtol=1e-5, atol=1e-7)
    if layout == "channels_last":
        assert s_req.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradients_fp64_equal_reference_autograd(impl, device, layout):
    """S carries no gradient by contract, so torch.autograd.gradcheck (finite differences
    through S) does not apply to adm_pool; its analytical gradient must equal autograd of the
    fp64 reference, whose detach is the same contract."""
    require(impl, device)
    s, t = make_pair((2, 9, 3, 5), torch.float64, device, layout, zero_pixels=True)
    w = torch.randn(2, 2, 9, dtype=torch.float64, device=device)
    s_req, t_req = s.detach().requires_grad_(), t.detach().requires_grad_()
    ps, pt = adm_pool(s_req, t_req, impl=impl)
    ((ps * w[0]).sum() + (pt * w[1]).sum()).backward()
    rps, rpt, rgs, rgt = _reference_with_grads(s, t, w)
    for got, want in ((ps, rps), (pt, rpt), (s_req.grad, rgs), (t_req.grad, rgt)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_error_rule(impl, device, dtype, layout):
    require(impl, device)
    s, t = make_pair((2, 40, 6, 6), dtype, device, layout)
    ps, pt = adm_pool(s, t, impl=impl)
    assert ps.dtype == dtype and pt.dtype == dtype
    rps, rpt = adm_pool_reference(s, t)
    r64s, r64t = adm_pool_reference(s.double(), t.double())
    assert_within_rule(ps, rps, r64s, "pooled_s")
    assert_within_rule(pt, rpt, r64t, "pooled_t")


@pytest.mark.parametrize("impl,device", impl_params())
def test_attention_maps_match_the_contract(impl, device):
    require(impl, device)
    s, t = make_pair((2, 8, 4, 6), torch.float64, device)
    _, _, attn_co, attn_di = adm_pool(s, t, impl=impl, return_attention=True)
    ref_co, ref_di = ops.adm_attention_reference(s, t)
    torch.testing.assert_close(attn_co, ref_co)
    torch.testing.assert_close(attn_di, ref_di)
    assert not attn_co.requires_grad


def test_identical_features_give_uniform_consensus():
    s = torch.randn(2, 8, 3, 3, dtype=torch.float64)  # fp32 rounding of 1 - S is ~eps/1e-5
    _, _, attn_co, attn_di = adm_pool(s, s.clone(), return_attention=True)
    torch.testing.assert_close(attn_co, torch.full_like(attn_co, 2 / (2 + 1e-5)))
    torch.testing.assert_close(attn_di, torch.zeros_like(attn_di), rtol=0, atol=1e-9)


@pytest.mark.parametrize("impl,device", impl_params())
def test_opcheck(impl, device):
    require(impl, device)
    s, t = make_pair((2, 8, 3, 4), torch.float32, device)
    op = torch.ops.kdengine.adm_pool_triton if impl == "triton" else torch.ops.kdengine.adm_pool
    torch.library.opcheck(op.default, (s.requires_grad_(), t.requires_grad_(), 1e-5))


def test_default_impl_is_the_compiled_kernel_of_the_device():
    s, t = make_pair((1, 4, 2, 2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        adm_pool(s, t)
    ran = {event.name for event in prof.events()}
    compiled = "cpu" in ops.available_impls(s.device)
    assert ("kdengine::adm_pool" in ran) == compiled
    assert "kdengine::adm_pool_triton" not in ran  # Triton only when asked for


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="triton not installed")
@pytest.mark.parametrize("interpret", ["0", "1"])
def test_triton_on_cpu_follows_the_interpreter_mode(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert ("triton" in ops.available_impls(torch.device("cpu"))) == (interpret == "1")


@pytest.mark.parametrize(
    "s_shape,t_shape,match",
    [
        ((2, 8, 4, 4), (2, 8, 4, 5), r"feat_s and feat_t must have the same shape.*\(2, 8, 4, 4\).*\(2, 8, 4, 5\)"),
        ((8, 4, 4), (8, 4, 4), r"feat_s must be \[B, C, H, W\], got shape \(8, 4, 4\)"),
        ((2, 8, 4, 4), (2, 8, 4), r"feat_t must be \[B, C, H, W\]"),
    ],
)
def test_bad_shapes_name_the_argument(s_shape, t_shape, match):
    with pytest.raises(ValueError, match=match):
        adm_pool(torch.randn(s_shape), torch.randn(t_shape))


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="feat_s must be float32"):
        adm_pool(torch.ones(1, 2, 2, 2, dtype=torch.int64), torch.ones(1, 2, 2, 2))
    with pytest.raises(ValueError, match="same dtype.*float32.*float16"):
        adm_pool(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="same device.*cpu.*meta"):
        adm_pool(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2, device="meta"))
    with pytest.raises(ValueError, match="impl must be one of"):
        adm_pool(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2), impl="fortran")


def test_compiled_op_checks_its_arguments_too():
    if "cpu" not in ops.available_impls(torch.device("cpu")):
        pytest.skip("extension not built")
    with pytest.raises(RuntimeError, match=r"feat_s and feat_t must have the same shape"):
        torch.ops.kdengine.adm_pool(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 2))
    with pytest.raises(RuntimeError, match=r"grad_pooled must be \[B, C\]"):
        torch.ops.kdengine._adm_pool_backward(torch.randn(3, 3), torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4))


@pytest.mark.skipif("cpu" not in ops.available_impls(torch.device("cpu")), reason="extension not built")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_gradients_are_streamed_correctly(layout):
    # 4 MiB per gradient: the CPU backward writes it with streaming stores, in row pieces that
    # cross row boundaries (49-pixel rows, 1024-element pieces).
    shape = (8, 2675, 7, 7)
    s, t = make_pair(shape, torch.float32, "cpu", layout)
    w = torch.randn(2, shape[0], shape[1])
    s_req, t_req = s.detach().requires_grad_(), t.detach().requires_grad_()
    ps, pt = adm_pool(s_req, t_req, impl="cpu")
    ((ps * w[0]).sum() + (pt * w[1]).sum()).backward()
    _, _, rgs, rgt = _reference_with_grads(s, t, w)
    torch.testing.assert_close(s_req.grad, rgs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t_req.grad, rgt, rtol=1e-5, atol=1e-7)
