"""The ops trace into torch.compile(fullgraph=True) graphs (fake kernels + registered autograd)."""
import pytest
import torch

from kdengine import ops
from kdengine.losses import ADMLoss

from .helpers import impl_params, make_pair, require


@pytest.mark.parametrize("impl,device", impl_params())
def test_ops_under_torch_compile_fullgraph(impl, device):
    require(impl, device)
    torch._dynamo.reset()
    s, t = make_pair((2, 12, 4, 5), torch.float32, device)

    def step(a, b):
        ps, pt = ops.adm_pool(a, b, impl=impl)
        sim = ops.cosine_similarity_map(a, b, impl=impl)
        return ps.sum() + pt.sum() + sim.sum() + ops.feature_mse(a, b, impl=impl)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a1, b1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    a2, b2 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out_c = compiled(a1, b1)
    out_e = step(a2, b2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


def test_admloss_under_inductor_fullgraph():
    """The whole loss through inductor (C++ codegen on CPU) matches eager."""
    if "cpu" not in ops.available_impls(torch.device("cpu")):
        pytest.skip("extension not built")
    torch._dynamo.reset()
    head_s, head_t = torch.nn.Linear(16, 5), torch.nn.Linear(16, 5)
    loss = ADMLoss(head_s, head_t, 0.2, 0.6, 0.5, impl="cpu")
    feats = [make_pair((3, c, h, h)) for c, h in ((8, 8), (16, 4), (16, 4))]
    target = torch.tensor([0, 3, 4])
    compiled = torch.compile(loss, fullgraph=True)

    def run(fn):
        fs = [f[0].clone().requires_grad_() for f in feats]
        ft = [f[1].clone().requires_grad_() for f in feats]
        out = fn(fs, ft, target)
        out.backward()
        return out, [x.grad for x in fs + ft]

    out_c, grads_c = run(compiled)
    out_e, grads_e = run(loss)
    torch.testing.assert_close(out_c, out_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, equal_nan=False)
