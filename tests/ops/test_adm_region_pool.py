"""adm_region_pool: every backend against the reference (the oracle), and the op's contract."""
import pytest
import torch

from kdengine import ops
from kdengine.ops.adm_region_pool import adm_region_pool, adm_region_pool_reference

from .helpers import DTYPES, assert_within_rule, impl_params, make_pair, require

K = 5
IGNORE = 255
SHAPES = [
    (2, 16, 5, 7),
    (1, 33, 4, 4),  # B=1, C not a multiple of any vector width
    (3, 7, 1, 1),  # H=W=1
    (2, 24, 20, 20),  # HW spans many blocks
]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


def _inputs(shape, dtype=torch.float32, device="cpu", layout="contiguous", attn_dtype=torch.float32):
    """Feature, attention and labels with blob-like regions, ignored pixels, a class absent from
    every image (K - 1), labels outside [0, K) (pooled nowhere), and in image 0 of a larger map a
    single class."""
    feat, _ = make_pair(shape, dtype, device, layout)
    B, _, H, W = shape
    gen = torch.Generator().manual_seed(H * W + B)
    attn = (torch.rand(B, H, W, generator=gen) * 2).to(device=device, dtype=attn_dtype)
    # Piecewise-constant classes (runs along rows, as in label maps), then some noise pixels.
    labels = (torch.arange(H * W).reshape(H, W) // 3 % (K - 1)).expand(B, H, W).clone()
    labels = (labels + torch.arange(B).view(B, 1, 1)) % (K - 1)
    noise = torch.rand(B, H, W, generator=gen)
    labels[noise < 0.15] = IGNORE
    labels[(noise >= 0.15) & (noise < 0.2)] = -1
    labels[(noise >= 0.2) & (noise < 0.25)] = K + 3
    if H * W >= 16:
        labels[0] = 2
    return feat, attn, labels.to(device)


def _reference_with_grad(feat, attn, labels, weight):
    x = feat.detach().requires_grad_()
    pooled, count = adm_region_pool_reference(x, attn, labels, K, IGNORE)
    (pooled * weight).sum().backward()
    return pooled.detach(), count, x.grad


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_fp32_matches_reference(impl, device, layout, shape):
    require(impl, device)
    if impl == "triton" and device == "cpu" and (layout == "noncontiguous" or shape[2] * shape[3] > 100):
        pytest.skip("kept small for the Triton interpreter")
    feat, attn, labels = _inputs(shape, torch.float32, device, layout)
    weight = torch.randn(shape[0], K, shape[1], device=device)
    x = feat.detach().requires_grad_()
    pooled, count = adm_region_pool(x, attn, labels, K, IGNORE, impl=impl)
    (pooled * weight).sum().backward()
    ref_pooled, ref_count, ref_grad = _reference_with_grad(feat, attn, labels, weight)
    assert pooled.dtype == torch.float32 and count.dtype == torch.int64
    torch.testing.assert_close(count, ref_count, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert (count[:, K - 1] == 0).all() and (pooled[:, K - 1] == 0).all()  # the absent class
    if layout == "channels_last":
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_noisy_labels_with_many_classes_match_reference(impl, device, layout):
    """Labels drawn per pixel from 23 classes: many classes in every block of pixels."""
    require(impl, device)
    shape, num_classes = (2, 8, 9, 11), 23
    feat, attn, _ = _inputs(shape, torch.float64, device, layout, attn_dtype=torch.float64)
    labels = torch.randint(-2, num_classes + 2, (2, 9, 11), generator=torch.Generator().manual_seed(3)).to(device)
    weight = torch.randn(2, num_classes, 8, dtype=torch.float64, device=device)
    x = feat.detach().requires_grad_()
    pooled, count = adm_region_pool(x, attn, labels, num_classes, 7, impl=impl)
    (pooled * weight).sum().backward()
    r = feat.detach().requires_grad_()
    ref_pooled, ref_count = adm_region_pool_reference(r, attn, labels, num_classes, 7)
    (ref_pooled * weight).sum().backward()
    torch.testing.assert_close(count, ref_count, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_fp64(impl, device, layout):
    """Finite differences in feat (attn is a constant); the feature is kept away from relu's
    kink so that the differences see one side of it."""
    require(impl, device)
    feat, attn, labels = _inputs((2, 5, 3, 4), torch.float64, device, layout, attn_dtype=torch.float64)
    feat = torch.where(feat.abs() < 0.05, feat + 0.1, feat).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    x = feat.detach().requires_grad_()
    # fast_mode (random projections) where every evaluation is a Triton interpreter run.
    fast = impl == "triton" and device == "cpu"
    torch.autograd.gradcheck(lambda f: adm_region_pool(f, attn, labels, K, IGNORE, impl=impl)[0], (x,),
                             fast_mode=fast)
    pooled, count = adm_region_pool(feat, attn, labels, K, IGNORE, impl=impl)
    ref_pooled, ref_count = adm_region_pool_reference(feat, attn, labels, K, IGNORE)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(count, ref_count)


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_error_rule(impl, device, dtype, layout):
    require(impl, device)
    feat, attn, labels = _inputs((2, 40, 6, 6), dtype, device, layout)
    pooled, count = adm_region_pool(feat, attn, labels, K, IGNORE, impl=impl)
    assert pooled.dtype == dtype
    ref, _ = adm_region_pool_reference(feat, attn, labels, K, IGNORE)
    ref64, ref_count = adm_region_pool_reference(feat.double(), attn.double(), labels, K, IGNORE)
    torch.testing.assert_close(count, ref_count)
    assert_within_rule(pooled, ref, ref64, "pooled")


def test_one_class_per_image_is_adm_global_pooling():
    """With one label covering the image, region pooling is Algorithm 1's mean_hw(A * relu(F))."""
    s, t = make_pair((3, 8, 4, 5), torch.float64)
    attn_co, _ = ops.adm_attention_reference(s, t)
    labels = torch.tensor([0, 3, 1]).view(3, 1, 1).expand(3, 4, 5)
    pooled, count = adm_region_pool(s, attn_co, labels, 4, IGNORE)
    expected = ops.weighted_pool_reference(s, attn_co)
    torch.testing.assert_close(pooled[torch.arange(3), torch.tensor([0, 3, 1])], expected)
    assert count.tolist() == [[20, 0, 0, 0], [0, 0, 0, 20], [0, 20, 0, 0]]


def test_counts_are_the_class_histogram_without_ignored_labels():
    feat, attn, labels = _inputs((2, 4, 6, 6))
    _, count = adm_region_pool(feat, attn, labels, K, IGNORE)
    for b in range(2):
        kept = labels[b][(labels[b] >= 0) & (labels[b] < K)]
        assert count[b].tolist() == torch.bincount(kept, minlength=K).tolist()


def test_ignore_index_inside_the_classes_is_dropped():
    feat, attn, _ = _inputs((1, 4, 2, 3))
    labels = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    pooled, count = adm_region_pool(feat, attn, labels, 3, ignore_index=1)
    assert count.tolist() == [[2, 0, 2]]
    assert (pooled[0, 1] == 0).all()


def test_integer_label_dtypes_are_accepted():
    feat, attn, labels = _inputs((2, 4, 3, 3))
    want = adm_region_pool(feat, attn, labels, K, IGNORE)
    for dtype in (torch.int32, torch.int16):
        torch.testing.assert_close(adm_region_pool(feat, attn, labels.to(dtype), K, IGNORE), want)


@pytest.mark.parametrize("impl,device", impl_params())
def test_opcheck(impl, device):
    require(impl, device)
    feat, attn, labels = _inputs((2, 8, 3, 4), torch.float32, device)
    op = torch.ops.kdengine.adm_region_pool_triton if impl == "triton" else torch.ops.kdengine.adm_region_pool
    torch.library.opcheck(op.default, (feat.requires_grad_(), attn, labels, K, IGNORE))


@pytest.mark.parametrize("impl,device", impl_params())
def test_under_torch_compile_fullgraph(impl, device):
    require(impl, device)
    torch._dynamo.reset()
    feat, attn, labels = _inputs((2, 12, 4, 5), torch.float32, device)

    def fn(x):
        pooled, count = adm_region_pool(x, attn, labels, K, IGNORE, impl=impl)
        return (pooled.sum(-1) * (count > 0)).sum()

    x1, x2 = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x1)
    want = fn(x2)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_default_impl_is_the_compiled_kernel_of_the_device():
    feat, attn, labels = _inputs((1, 4, 2, 2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        adm_region_pool(feat, attn, labels, K)
    ran = {event.name for event in prof.events()}
    assert ("kdengine::adm_region_pool" in ran) == ("cpu" in ops.available_impls(feat.device))
    assert "kdengine::adm_region_pool_triton" not in ran


def test_bad_inputs_name_the_argument():
    feat, attn, labels = _inputs((2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"feat must be \[B, C, H, W\], got shape \(4, 3, 3\)"):
        adm_region_pool(feat[0], attn, labels, K)
    with pytest.raises(ValueError, match=r"attn must be \[B, H, W\] = \[2, 3, 3\].*got \(2, 3, 4\)"):
        adm_region_pool(feat, torch.ones(2, 3, 4), labels, K)
    with pytest.raises(ValueError, match=r"labels must be \[B, H, W\] = \[2, 3, 3\].*got \(2, 9\)"):
        adm_region_pool(feat, attn, labels.reshape(2, 9), K)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor"):
        adm_region_pool(feat, attn, labels.float(), K)
    with pytest.raises(ValueError, match=r"attn must be float32"):
        adm_region_pool(feat, attn.long(), labels, K)
    with pytest.raises(ValueError, match=r"feat must be float32"):
        adm_region_pool(feat.long(), attn, labels, K)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1, got 0"):
        adm_region_pool(feat, attn, labels, 0)
    with pytest.raises(ValueError, match=r"labels is on meta"):
        adm_region_pool(feat, attn, labels.to("meta"), K)
    with pytest.raises(TypeError, match=r"attn must be a torch.Tensor"):
        adm_region_pool(feat, 1.0, labels, K)


def test_compiled_op_checks_its_arguments_too():
    if "cpu" not in ops.available_impls(torch.device("cpu")):
        pytest.skip("extension not built")
    feat, attn, labels = _inputs((2, 4, 3, 3))
    with pytest.raises(RuntimeError, match=r"labels must be an int64 tensor"):
        torch.ops.kdengine.adm_region_pool(feat, attn, labels.int(), K)
    with pytest.raises(RuntimeError, match=r"attn must be \[B, H, W\]"):
        torch.ops.kdengine.adm_region_pool(feat, attn[:, :2], labels, K)
    with pytest.raises(RuntimeError, match=r"num_classes must be at least 1"):
        torch.ops.kdengine.adm_region_pool(feat, attn, labels, 0)
    count = torch.zeros(2, K, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"grad_pooled must be \[B, K, C\]"):
        torch.ops.kdengine._adm_region_pool_backward(torch.zeros(2, K, 5), feat, attn, labels, count, IGNORE)
    with pytest.raises(RuntimeError, match=r"count must be \[B, K\]"):
        torch.ops.kdengine._adm_region_pool_backward(torch.zeros(2, K, 4), feat, attn, labels, count[:, :2], IGNORE)
