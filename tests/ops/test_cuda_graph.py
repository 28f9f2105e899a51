"""The ops launch on the current stream without host syncs, so a whole forward + backward can be
captured in a CUDA graph and replayed (the engine's teacher-student step relies on it)."""
import pytest
import torch

from kdengine import ops

from .helpers import make_pair, require


def all_ops_loss(s, t, impl):
    """A scalar through every op, forward and backward."""
    ps, pt = ops.adm_pool(s, t, impl=impl)
    sim = ops.cosine_similarity_map(s, t, impl=impl)
    return ps.float().sum() + pt.float().sum() + sim.float().mean() + ops.feature_mse(s, t, impl=impl).float()


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_backward_replays_in_a_cuda_graph(impl, dtype):
    require(impl, "cuda")
    s, t = make_pair((4, 64, 14, 14), dtype, "cuda", "channels_last")
    static_s = s.clone().requires_grad_()
    static_t = t.clone().requires_grad_()

    def step():
        static_s.grad = None
        static_t.grad = None
        loss = all_ops_loss(static_s, static_t, impl)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton autotuning, allocator) off the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    new_s, new_t = make_pair((4, 64, 14, 14), dtype, "cuda", "channels_last")
    new_s, new_t = new_s * 0.5, new_t + 0.25
    with torch.no_grad():
        static_s.copy_(new_s)
        static_t.copy_(new_t)
    graph.replay()
    torch.cuda.synchronize()

    eager_s, eager_t = new_s.clone().requires_grad_(), new_t.clone().requires_grad_()
    loss = all_ops_loss(eager_s, eager_t, impl)
    loss.backward()
    torch.testing.assert_close(static_loss, loss)
    torch.testing.assert_close(static_s.grad, eager_s.grad)
    torch.testing.assert_close(static_t.grad, eager_t.grad)
