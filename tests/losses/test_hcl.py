"""hcl: PAT's hierarchical feature loss, against a hand computation; the teacher side is not detached."""
import pytest
import torch

from kdengine.losses import hcl, hcl_loss
from kdengine.losses.hcl import map_to_tokens, tokens_to_map


def _mse(a, b):
    return ((a - b) ** 2).sum() / a.numel()


def _pool(x, k):
    """Average over k x k blocks of equal size (what adaptive pooling does when k divides H)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, k, h // k, k, w // k).mean(dim=(3, 5))


def test_hcl_by_hand_at_8x8():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    want = (_mse(s, t) + _mse(_pool(s, 4), _pool(t, 4)) / 2 + _mse(_pool(s, 2), _pool(t, 2)) / 4
            + _mse(_pool(s, 1), _pool(t, 1)) / 8) / 1.875
    torch.testing.assert_close(hcl(s, t), want)


def test_levels_not_smaller_than_the_map_are_skipped():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    # 4 x 4: level 4 skipped; 2 x 2 weighs 1/2 and 1 x 1 weighs 1/4 (each used level halves the weight)
    want = (_mse(s, t) + _mse(_pool(s, 2), _pool(t, 2)) / 2 + _mse(_pool(s, 1), _pool(t, 1)) / 4) / 1.75
    torch.testing.assert_close(hcl(s, t), want)
    s1, t1 = s[..., :1, :1], t[..., :1, :1]
    torch.testing.assert_close(hcl(s1, t1), _mse(s1, t1))


def test_7x7_uses_adaptive_pooling():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 2, 7, 7, generator=g, dtype=torch.float64)
    t = torch.zeros_like(s)
    # adaptive 4 x 4 over 7 rows takes rows [0,2), [1,4), [3,6), [5,7): overlapping windows
    rows = [(0, 2), (1, 4), (3, 6), (5, 7)]
    p4 = torch.stack([torch.stack([s[..., a:b, c:d].mean((-1, -2)) for c, d in rows], -1) for a, b in rows], -2)
    rows2 = [(0, 4), (3, 7)]
    p2 = torch.stack([torch.stack([s[..., a:b, c:d].mean((-1, -2)) for c, d in rows2], -1) for a, b in rows2], -2)
    want = ((s ** 2).mean() + (p4 ** 2).mean() / 2 + (p2 ** 2).mean() / 4 + (s.mean((2, 3)) ** 2).mean() / 8) / 1.875
    torch.testing.assert_close(hcl(s, t), want)


def test_tokens_are_reshaped_to_their_square_grid():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 16, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 16, 5, generator=g, dtype=torch.float64)
    ms, mt = tokens_to_map(s), tokens_to_map(t)
    assert ms.shape == (2, 5, 4, 4)
    assert torch.equal(ms[0, :, 1, 2], s[0, 1 * 4 + 2])  # row-major
    assert torch.equal(map_to_tokens(ms), s)
    torch.testing.assert_close(hcl(s, t), hcl(ms, mt))
    with pytest.raises(ValueError, match="15 tokens do not form a square grid"):
        hcl(s[:, 1:], t[:, 1:])


def test_gradients_reach_both_sides_and_stages_are_summed():
    g = torch.Generator().manual_seed(4)
    s = [torch.randn(2, 3, h, h, generator=g, dtype=torch.float64, requires_grad=True) for h in (8, 2)]
    t = [torch.randn(2, 3, h, h, generator=g, dtype=torch.float64, requires_grad=True) for h in (8, 2)]
    loss = hcl_loss(s, t)
    torch.testing.assert_close(loss, hcl(s[0], t[0]) + hcl(s[1], t[1]))
    loss.backward()
    for a, b in zip(s, t):
        assert b.grad is not None  # not detached: this is what trains PAT's prompts
        torch.testing.assert_close(b.grad, -a.grad)


def test_bad_inputs_error_clearly():
    with pytest.raises(ValueError, match=r"feat_s \(2, 3, 4, 4\) and feat_t \(2, 3, 2, 2\) differ"):
        hcl(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="1 student and 2 teacher features"):
        hcl_loss([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 1, 2, 2)] * 2)
