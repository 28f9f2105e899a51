import pytest
import torch
import torch.nn.functional as F

from kdengine.losses import DMLLoss, mutual_kl


def test_two_models_match_eq_2_to_4():
    z1 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,))
    loss = DMLLoss()([z1, z2], y)
    p1, p2 = torch.softmax(z1, 1).detach(), torch.softmax(z2, 1).detach()
    kl_12 = (p2 * (p2.log() - torch.log_softmax(z1, 1))).sum(1).mean()
    kl_21 = (p1 * (p1.log() - torch.log_softmax(z2, 1))).sum(1).mean()
    expected = F.cross_entropy(z1, y) + kl_12 + F.cross_entropy(z2, y) + kl_21
    torch.testing.assert_close(loss, expected)
    # The other model is detached: z1's gradient comes from its own terms only.
    g1 = torch.autograd.grad(loss, z1)[0]
    g1_own = torch.autograd.grad(F.cross_entropy(z1, y) + kl_12, z1)[0]
    torch.testing.assert_close(g1, g1_own)


def test_three_models_average_the_others():
    zs = [torch.randn(4, 5) for _ in range(3)]
    y = torch.randint(0, 5, (4,))
    terms = DMLLoss(weight=0.5, temperature=2.0).per_model(zs, y)
    p = [torch.softmax(z / 2, 1) for z in zs]
    kl = lambda m, n: 4 * (p[n] * (p[n].log() - torch.log_softmax(zs[m] / 2, 1))).sum(1).mean()  # noqa: E731
    torch.testing.assert_close(terms[0], F.cross_entropy(zs[0], y) + 0.5 * (kl(0, 1) + kl(0, 2)) / 2)


def test_bad_input():
    with pytest.raises(ValueError, match="two or more"):
        DMLLoss()([torch.randn(2, 3)], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one shape"):
        DMLLoss()([torch.randn(2, 3), torch.randn(2, 4)], torch.zeros(2, dtype=torch.long))


def test_mutual_kl_is_dmlloss_distillation_term_and_takes_gates():
    zs = [torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 5, (4,))
    p = [torch.softmax(z.detach() / 2, 1) for z in zs]
    kl = lambda m, n: 4 * (p[n] * (p[n].log() - torch.log_softmax(zs[m] / 2, 1))).sum(1).mean()  # noqa: E731
    terms = mutual_kl(zs, 2.0)
    for m in range(3):
        torch.testing.assert_close(terms[m], sum(kl(m, n) for n in range(3) if n != m) / 2)
    # DMLLoss is CE + weight * mutual_kl, model by model
    for t, k, z in zip(DMLLoss(weight=0.5, temperature=2.0).per_model(zs, y), terms, zs):
        torch.testing.assert_close(t, F.cross_entropy(z, y) + 0.5 * k)
    # a gate scales one (model, other) term before the average; the others are untouched
    g = torch.tensor(0.0, dtype=torch.float64)
    gated = mutual_kl(zs, 2.0, {(0, 1): g})
    torch.testing.assert_close(gated[0], kl(0, 2) / 2)
    torch.testing.assert_close(gated[1], terms[1])
    # the other models' predictions are targets: no gradient flows into them
    (g1,) = torch.autograd.grad(terms[0], [zs[1]], allow_unused=True)
    assert g1 is None or g1.abs().max() == 0
