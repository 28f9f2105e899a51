"""adm_maps: every backend against the reference (the oracle), and the op's contract."""
import pytest
import torch

from kdengine import ops
from kdengine.ops.adm_maps import adm_maps, adm_maps_reference

from .helpers import DTYPES, assert_within_rule, impl_params, make_pair, require

SHAPES = [
    (2, 16, 5, 7),
    (1, 33, 4, 4),  # B=1, C not a multiple of any vector width
    (3, 7, 1, 1),  # H=W=1
    (2, 24, 20, 20),  # HW spans many tiles
]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


def _valid(shape, device, kind):
    """None, a random mask, or a mask with one image entirely invalid (its mean is 0)."""
    if kind == "none":
        return None
    B, _, H, W = shape
    gen = torch.Generator().manual_seed(B * 1000 + H * W)
    valid = torch.rand(B, H, W, generator=gen) > 0.3
    if kind == "empty_image":
        valid[0] = False
    return valid.to(device)


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("valid_kind", ["none", "mask", "empty_image"])
def test_fp32_matches_reference(impl, device, layout, shape, valid_kind):
    require(impl, device)
    if impl == "triton" and device == "cpu" and (layout == "noncontiguous" or shape[2] * shape[3] > 100):
        pytest.skip("kept small for the Triton interpreter")
    s, t = make_pair(shape, torch.float32, device, layout, zero_pixels=True)
    valid = _valid(shape, device, valid_kind)
    co, di = adm_maps(s, t, valid, impl=impl)
    ref_co, ref_di = adm_maps_reference(s, t, valid)
    assert co.dtype == di.dtype == torch.float32 and co.shape == (shape[0], *shape[2:])
    torch.testing.assert_close(co, ref_co, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(di, ref_di, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fp64_equals_reference(impl, device, layout):
    require(impl, device)
    shape = (2, 9, 3, 5)
    s, t = make_pair(shape, torch.float64, device, layout, zero_pixels=True)
    valid = _valid(shape, device, "mask")
    for got, want in zip(adm_maps(s, t, valid, impl=impl), adm_maps_reference(s, t, valid)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_low_precision_error_rule(impl, device, dtype):
    require(impl, device)
    shape = (2, 40, 6, 6)
    s, t = make_pair(shape, dtype, device)
    valid = _valid(shape, device, "mask")
    got = adm_maps(s, t, valid, impl=impl)
    ref = adm_maps_reference(s, t, valid)
    ref64 = adm_maps_reference(s.double(), t.double(), valid)
    for name, g, r, r64 in zip(("attn_co", "attn_di"), got, ref, ref64):
        assert g.dtype == torch.float32
        assert_within_rule(g, r, r64, name)


def test_without_valid_map_these_are_adm_pool_maps():
    """With every pixel valid, the dense maps are the classification ADM's (Algorithm 1)."""
    s, t = make_pair((2, 8, 4, 6), torch.float64)
    co, di = adm_maps(s, t)
    ref_co, ref_di = ops.adm_attention_reference(s, t)
    torch.testing.assert_close(co, ref_co)
    torch.testing.assert_close(di, ref_di)
    all_valid = torch.ones(2, 4, 6, dtype=torch.bool)
    for a, b in zip(adm_maps(s, t, all_valid), (co, di)):
        torch.testing.assert_close(a, b)


def test_means_run_over_valid_pixels_only():
    s, t = make_pair((1, 8, 4, 4), torch.float64)
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[0, :2] = True
    co, di = adm_maps(s, t, valid)
    sim = torch.nn.functional.cosine_similarity(s, t, dim=1)
    mean = sim[valid].mean()
    torch.testing.assert_close(co, (1 + sim) / (1 + mean + 1e-5))
    torch.testing.assert_close(di, (1 - sim) / ((1 - mean) + 1e-5))
    # The valid pixels' consensus map averages to 1 (up to eps), whatever the invalid pixels hold.
    torch.testing.assert_close(co[valid].mean(), (1 + mean) / (1 + mean + 1e-5))


@pytest.mark.parametrize("impl,device", impl_params())
def test_maps_carry_no_gradient(impl, device):
    require(impl, device)
    s, t = make_pair((2, 8, 3, 4), torch.float32, device)
    co, di = adm_maps(s.requires_grad_(), t.requires_grad_(), impl=impl)
    assert not co.requires_grad and not di.requires_grad


@pytest.mark.parametrize("impl,device", impl_params())
def test_opcheck(impl, device):
    require(impl, device)
    s, t = make_pair((2, 8, 3, 4), torch.float32, device)
    valid = _valid((2, 8, 3, 4), device, "mask")
    op = torch.ops.kdengine.adm_maps_triton if impl == "triton" else torch.ops.kdengine.adm_maps
    torch.library.opcheck(op.default, (s.requires_grad_(), t.requires_grad_(), valid, 1e-5))
    torch.library.opcheck(op.default, (s, t, None, 1e-5))


@pytest.mark.parametrize("impl,device", impl_params())
def test_under_torch_compile_fullgraph(impl, device):
    require(impl, device)
    torch._dynamo.reset()
    s, t = make_pair((2, 12, 4, 5), torch.float32, device)
    valid = _valid((2, 12, 4, 5), device, "mask")

    def fn(a, b, v):
        co, di = adm_maps(a, b, v, impl=impl)
        return co * 2 + di

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(s, t, valid)
    torch.testing.assert_close(got, fn(s, t, valid))


def test_default_impl_is_the_compiled_kernel_of_the_device():
    s, t = make_pair((1, 4, 2, 2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        adm_maps(s, t)
    ran = {event.name for event in prof.events()}
    assert ("kdengine::adm_maps" in ran) == ("cpu" in ops.available_impls(s.device))
    assert "kdengine::adm_maps_triton" not in ran  # Triton only when asked for


def test_bad_inputs_name_the_argument():
    s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"feat_s and feat_t must have the same shape"):
        adm_maps(s, torch.randn(2, 8, 4, 5))
    with pytest.raises(ValueError, match=r"feat_s must be \[B, C, H, W\]"):
        adm_maps(torch.randn(8, 4, 4), torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor, got torch.float32"):
        adm_maps(s, t, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"valid must be \[B, H, W\] = \[2, 4, 4\].*got \(2, 4, 5\)"):
        adm_maps(s, t, torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"valid is on meta"):
        adm_maps(s, t, torch.ones(2, 4, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match=r"valid must be None or a torch.Tensor"):
        adm_maps(s, t, [[True]])
    with pytest.raises(ValueError, match="impl must be one of"):
        adm_maps(s, t, impl="fortran")


def test_compiled_op_checks_its_arguments_too():
    if "cpu" not in ops.available_impls(torch.device("cpu")):
        pytest.skip("extension not built")
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"feat_s and feat_t must have the same shape"):
        torch.ops.kdengine.adm_maps(s, torch.randn(2, 3, 4, 2))
    with pytest.raises(RuntimeError, match=r"valid must be \[B, H, W\]"):
        torch.ops.kdengine.adm_maps(s, t, torch.ones(2, 4, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"valid must be a bool tensor"):
        torch.ops.kdengine.adm_maps(s, t, torch.ones(2, 4, 4))
