"""raa_attention: every backend against the pure-PyTorch oracle (values and the gradients of q, k,
v and pos), fp64 gradcheck, opcheck, torch.compile, and argument checks."""
import pytest
import torch

from kdengine import ops
from kdengine.ops import raa_attention, raa_attention_reference

from .helpers import assert_within_rule, impl_params, require

# (B, N, heads, head dim): N in {1, 16, 64, 256} x head dim in {8, 64, 128}, an odd N and
# several heads.
SHAPES = [
    (2, 1, 2, 8),
    (3, 16, 3, 8),
    (2, 16, 2, 64),
    (2, 33, 2, 64),
    (2, 64, 1, 128),
    (2, 64, 8, 8),
    (1, 256, 2, 8),
    (2, 256, 1, 64),
    (1, 256, 1, 128),
]
POS_FORMS = ["token", "batch"]


def make_inputs(B, N, heads, d, dtype=torch.float32, device="cpu", pos_form="token", layout="contiguous"):
    """q, k, v [B, N, D] and pos ([N, D] or [B, 1, D]) with O(1) scores. ``layout="noncontiguous"``:
    q is a transposed view (copied by the kernels), k and v the halves of one projection (read in
    place: unit channel stride, token stride 2D), pos a transposed view."""
    D = heads * d
    gen = torch.Generator().manual_seed(hash((B, N, heads, d, str(dtype), pos_form, layout)) % 2**31)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    if layout == "noncontiguous":
        q = randn(B, D, N).transpose(1, 2)
        k, v = randn(B, N, 2 * D).chunk(2, dim=-1)
        pos = randn(D, N, scale=0.5).t() if pos_form == "token" else randn(B, D, 1, scale=0.5).transpose(1, 2)
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    else:
        q, k, v = randn(B, N, D), randn(B, N, D), randn(B, N, D)
        pos = randn(N, D, scale=0.5) if pos_form == "token" else randn(B, 1, D, scale=0.5)
    return q, k, v, pos


def _run(fn, inputs, heads, grad_out):
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves, heads)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def _assert_close(got, want, what, rtol=1e-4):
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 0.1 * max(scale, 1e-3), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("pos_form", POS_FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_fp32_matches_reference(impl, device, pos_form, shape):
    require(impl, device)
    B, N, heads, d = shape
    inputs = make_inputs(*shape, torch.float32, device, pos_form)
    grad_out = torch.randn(B, N, heads * d, device=device)
    out, grads = _run(lambda *a: raa_attention(*a, impl=impl), inputs, heads, grad_out)
    ref, ref_grads = _run(raa_attention_reference, inputs, heads, grad_out)
    _assert_close(out, ref, "out")
    for name, g, r in zip(("q", "k", "v", "pos"), grads, ref_grads):
        assert g.shape == r.shape and g.is_contiguous()
        _assert_close(g, r, f"grad_{name}")


@pytest.mark.slow
@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("pos_form", POS_FORMS)
def test_pat_default_shape(impl, device, pos_form):
    """PAT's RAA as configured: 64 tokens of 512 channels in 8 heads, a batch of 16."""
    require(impl, device)
    B, N, heads, d = 16, 64, 8, 64
    inputs = make_inputs(B, N, heads, d, torch.float32, device, pos_form)
    grad_out = torch.randn(B, N, heads * d, device=device)
    out, grads = _run(lambda *a: raa_attention(*a, impl=impl), inputs, heads, grad_out)
    ref, ref_grads = _run(raa_attention_reference, inputs, heads, grad_out)
    _assert_close(out, ref, "out")
    for name, g, r in zip(("q", "k", "v", "pos"), grads, ref_grads):
        _assert_close(g, r, f"grad_{name}")


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("pos_form", POS_FORMS)
def test_noncontiguous_inputs(impl, device, pos_form):
    require(impl, device)
    B, N, heads, d = 2, 16, 2, 8
    inputs = make_inputs(B, N, heads, d, torch.float32, device, pos_form, layout="noncontiguous")
    grad_out = torch.randn(B, N, heads * d, device=device).transpose(0, 1).contiguous().transpose(0, 1)
    out, grads = _run(lambda *a: raa_attention(*a, impl=impl), inputs, heads, grad_out)
    ref, ref_grads = _run(raa_attention_reference, inputs, heads, grad_out)
    _assert_close(out, ref, "out")
    for name, g, r in zip(("q", "k", "v", "pos"), grads, ref_grads):
        _assert_close(g, r, f"grad_{name}")


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pos_form", POS_FORMS)
def test_low_precision_error_rule(impl, device, dtype, pos_form):
    """Kernel error against fp64 at most 2x the eager reference's error in the same dtype, for
    the output and all four gradients."""
    require(impl, device)
    B, N, heads, d = 2, 64, 2, 32
    inputs = make_inputs(B, N, heads, d, dtype, device, pos_form)
    grad_out = torch.randn(B, N, heads * d, device=device, dtype=torch.float64).to(dtype)
    out, grads = _run(lambda *a: raa_attention(*a, impl=impl), inputs, heads, grad_out)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref, ref_grads = _run(raa_attention_reference, inputs, heads, grad_out)
    ref64, ref64_grads = _run(raa_attention_reference, [x.double() for x in inputs], heads, grad_out.double())
    assert_within_rule(out, ref, ref64, "out")
    for name, g, r, r64 in zip(("q", "k", "v", "pos"), grads, ref_grads, ref64_grads):
        assert_within_rule(g, r, r64, f"grad_{name}")


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("pos_form", POS_FORMS)
def test_gradcheck_fp64(impl, device, pos_form):
    require(impl, device)
    B, N, heads, d = 2, 5, 2, 3
    inputs = [x.detach().requires_grad_() for x in make_inputs(B, N, heads, d, torch.float64, device, pos_form)]
    # The interpreter is slow per call: random-direction (fast mode) checks there.
    assert torch.autograd.gradcheck(
        lambda q, k, v, pos: raa_attention(q, k, v, pos, heads, impl=impl),
        inputs,
        fast_mode=impl == "triton" and device == "cpu",
    )


@pytest.mark.parametrize("impl,device", impl_params())
@pytest.mark.parametrize("pos_form", POS_FORMS)
def test_opcheck(impl, device, pos_form):
    require(impl, device)
    q, k, v, pos = make_inputs(2, 8, 2, 16, torch.float32, device, pos_form)
    op = torch.ops.kdengine.raa_attention_triton if impl == "triton" else torch.ops.kdengine.raa_attention
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), pos.requires_grad_(), 2)
    torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("impl,device", impl_params())
def test_under_torch_compile_fullgraph(impl, device):
    require(impl, device)
    torch._dynamo.reset()
    inputs = make_inputs(2, 16, 2, 16, torch.float32, device, "token")

    def step(q, k, v, pos):
        return (raa_attention(q, k, v, pos, 2, impl=impl) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_leaves = [x.detach().requires_grad_() for x in inputs]
    compiled_leaves = [x.detach().requires_grad_() for x in inputs]
    out_e, out_c = step(*eager_leaves), compiled(*compiled_leaves)
    out_e.backward()
    out_c.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_default_impl_is_the_compiled_kernel_of_the_device():
    q, k, v, pos = make_inputs(1, 4, 2, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        raa_attention(q, k, v, pos, 2)
    ran = {event.name for event in prof.events()}
    assert ("kdengine::raa_attention" in ran) == ("cpu" in ops.available_impls(q.device))
    assert "kdengine::raa_attention_triton" not in ran


def test_beyond_the_kernel_limits_default_is_the_reference_and_explicit_kernels_refuse():
    if "cpu" not in ops.available_impls(torch.device("cpu")):
        pytest.skip("extension not built")
    q, k, v, pos = make_inputs(1, 257, 1, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = raa_attention(q, k, v, pos, 1)
    assert "kdengine::raa_attention" not in {event.name for event in prof.events()}
    torch.testing.assert_close(out, raa_attention_reference(q, k, v, pos, 1))
    with pytest.raises(ValueError, match=r"q has N = 257 tokens.*at most 256.*impl='cpu'"):
        raa_attention(q, k, v, pos, 1, impl="cpu")
    q, k, v, pos = make_inputs(1, 4, 1, 160)
    with pytest.raises(ValueError, match=r"head dim D / heads = 160 / 1 = 160.*128"):
        raa_attention(q, k, v, pos, 1, impl="cpu")
    with pytest.raises(RuntimeError, match=r"q has N = 257 tokens"):
        torch.ops.kdengine.raa_attention(*make_inputs(1, 257, 1, 8), 1)


def test_pos_forms_are_indexed_as_documented():
    """Token-indexed pos adds row n to token n of every sample; batch-indexed adds row b to every
    token of sample b (the authors' code: the q-side term cancels in the softmax, the k-side one
    does not)."""
    q, k, v, _ = make_inputs(2, 6, 2, 4, torch.float64)
    token_pos = torch.randn(6, 8, dtype=torch.float64)
    batch_pos = torch.randn(2, 1, 8, dtype=torch.float64)
    for impl in ops.available_impls(q.device):
        got = raa_attention(q, k, v, token_pos, 2, impl=impl)
        want = raa_attention_reference(q + token_pos, k + token_pos, v, torch.zeros(6, 8, dtype=torch.float64), 2)
        torch.testing.assert_close(got, want)
        got = raa_attention(q, k, v, batch_pos, 2, impl=impl)
        expanded = batch_pos.expand(2, 6, 8)
        want = raa_attention_reference(q + expanded, k + expanded, v, torch.zeros(6, 8, dtype=torch.float64), 2)
        torch.testing.assert_close(got, want)


def _bad(q_shape=(2, 4, 8), k_shape=None, v_shape=None, pos_shape=(4, 8), heads=2, **dtypes):
    def t(shape, name):
        dtype = dtypes.get(name, torch.float32)
        return torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)

    return t(q_shape, "q"), t(k_shape or q_shape, "k"), t(v_shape or q_shape, "v"), t(pos_shape, "pos"), heads


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (_bad(q_shape=(4, 8), pos_shape=(4, 8)), ValueError, r"q must be \[B, N, D\], got shape \(4, 8\)"),
        (_bad(k_shape=(2, 4, 6)), ValueError, r"k must have q's shape \[B, N, D\] = \(2, 4, 8\), got \(2, 4, 6\)"),
        (_bad(v_shape=(2, 5, 8)), ValueError, r"v must have q's shape .*got \(2, 5, 8\)"),
        (_bad(heads=3), ValueError, r"heads = 3 must divide D = 8"),
        (_bad(heads=0), ValueError, r"heads = 0 must divide D = 8"),
        (_bad(heads=2.0), TypeError, r"heads must be an int"),
        (_bad(pos_shape=(4, 6)), ValueError, r"pos must be \[N, D\] = \(4, 8\).*\(2, 1, 8\).*got \(4, 6\)"),
        (_bad(pos_shape=(2, 4, 8)), ValueError, r"pos must be .*got \(2, 4, 8\)"),
        (_bad(k=torch.float16), ValueError, r"k must have q's dtype torch.float32, got torch.float16"),
        (_bad(q=torch.int64, k=torch.int64, v=torch.int64, pos=torch.int64), ValueError, r"q must be float32"),
    ],
)
def test_bad_input_names_the_argument(args, exc, match):
    q, k, v, pos, heads = args
    with pytest.raises(exc, match=match):
        raa_attention(q, k, v, pos, heads)


def test_bad_device_and_impl():
    q, k, v, pos = make_inputs(2, 4, 2, 4)
    with pytest.raises(ValueError, match=r"pos is on meta but q is on cpu"):
        raa_attention(q, k, v, pos.to("meta"), 2)
    with pytest.raises(ValueError, match="impl must be one of"):
        raa_attention(q, k, v, pos, 2, impl="fortran")


def test_compiled_op_checks_its_arguments_too():
    if "cpu" not in ops.available_impls(torch.device("cpu")):
        pytest.skip("extension not built")
    q, k, v, pos = make_inputs(2, 4, 2, 4)
    with pytest.raises(RuntimeError, match=r"pos must be \[N, D\] = \[4, 8\]"):
        torch.ops.kdengine.raa_attention(q, k, v, pos[:3], 2)
    with pytest.raises(RuntimeError, match=r"heads = 3 must divide D = 8"):
        torch.ops.kdengine.raa_attention(q, k, v, pos, 3)
    with pytest.raises(RuntimeError, match=r"v must have q's dtype"):
        torch.ops.kdengine.raa_attention(q, k, v.double(), pos, 2)
    out, lse = torch.ops.kdengine.raa_attention(q, k, v, pos, 2)
    with pytest.raises(RuntimeError, match=r"lse must be \[B, heads, N\] = \[2, 2, 4\]"):
        torch.ops.kdengine._raa_attention_backward(out, q, k, v, pos, lse[:, :1], 2)
    with pytest.raises(RuntimeError, match=r"grad_out must have q's shape"):
        torch.ops.kdengine._raa_attention_backward(out[:1], q, k, v, pos, lse, 2)


def test_empty_batch():
    q, k, v, pos = make_inputs(0, 4, 2, 4, pos_form="token")
    for impl in ops.available_impls(q.device):
        leaves = [x.detach().requires_grad_() for x in (q, k, v, pos)]
        out = raa_attention(*leaves, 2, impl=impl)
        assert out.shape == (0, 4, 8)
        out.sum().backward()
        assert leaves[3].grad.shape == pos.shape and not leaves[3].grad.any()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pos_form", POS_FORMS)
def test_cuda_streams_long_fp32_sequences_in_chunks(dtype, pos_form):
    """N * d = 256 * 128 in fp32 (and fp64) exceeds one block's shared memory: the kernels stream
    the keys in chunks (online softmax forward, two passes backward)."""
    require("cuda", "cuda")
    B, N, heads, d = 2, 256, 2, 128
    inputs = make_inputs(B, N, heads, d, dtype, "cuda", pos_form)
    grad_out = torch.randn(B, N, heads * d, device="cuda", dtype=dtype)
    out, grads = _run(lambda *a: raa_attention(*a, impl="cuda"), inputs, heads, grad_out)
    ref, ref_grads = _run(raa_attention_reference, [x.double() for x in inputs], heads, grad_out.double())
    _assert_close(out.double(), ref, "out")
    for name, g, r in zip(("q", "k", "v", "pos"), grads, ref_grads):
        _assert_close(g.double(), r, f"grad_{name}")


@pytest.mark.cuda
def test_cuda_graph_capture_replays_forward_and_backward():
    require("cuda", "cuda")
    inputs = [x.detach().requires_grad_() for x in make_inputs(4, 64, 8, 64, torch.float32, "cuda")]

    def step():
        for x in inputs:
            x.grad = None
        raa_attention(*inputs, 8, impl="cuda").square().sum().backward()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    expected = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None  # the captured backward allocates them from the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        raa_attention(*inputs, 8, impl="cuda").square().sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    for x, want in zip(inputs, expected):
        torch.testing.assert_close(x.grad, want)
