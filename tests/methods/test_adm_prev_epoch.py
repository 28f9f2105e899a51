"""ADM's di="kd" (Eq. 12): the teacher's previous-epoch prediction per sample, swapped per epoch."""
import pytest
import torch

from kdengine.losses import ADMLoss, kd_delta
from kdengine.methods import build_method

from .fakes import FakeNet, random_outputs

T_CH, S_CH = (4, 8, 16), (4, 8, 8)
N, K = 10, 7


def make(num_samples=N, **adm):
    models = [FakeNet(T_CH).double(), FakeNet(S_CH).double()]
    adm = {"di": "kd", "alpha": 0.0, "beta": 1.0, "gamma": 0.0, **adm}
    m = build_method("dml+adm", models, roles=("teacher", "student"), num_classes=K,
                     num_samples=num_samples, adm=adm).double()
    return models, m


def step(m, seed, indices):
    outs = random_outputs([T_CH, S_CH], b=len(indices), seed=seed)
    y = torch.randint(0, K, (len(indices),), generator=torch.Generator().manual_seed(seed))
    return outs, y, m(outs, y, indices=torch.tensor(indices))


def stock_di(models, m, outs, y, prev=None, delta=None):
    stock = ADMLoss(models[1].head, models[0].head, 0.0, 1.0, 0.0, "ce", "kd",
                    student_channels=S_CH, teacher_channels=T_CH).double()
    stock.load_state_dict(m.adm.losses[0].state_dict())
    return stock(outs[1].features, outs[0].features, y, teacher_prev_probs=prev, delta=delta)


def test_needs_indices_and_a_buffer_pair():
    models, m = make()
    assert m.needs_indices
    assert m.adm.prev_probs_0.shape == (2 * N, K) and m.adm.delta.item() == pytest.approx(0.2)
    plain = build_method("dml+adm", models, roles=("teacher", "student"), num_classes=K)
    assert not plain.needs_indices  # di="ce" needs none


def test_previous_epoch_predictions_across_start_and_end_epoch():
    models, m = make()
    epochs = 3
    # epoch 0: nothing stored yet -> the target is the one-hot label
    m.start_epoch(0, epochs)
    outs0, y0, out = step(m, 1, [0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(out.terms["di/0"], stock_di(models, m, outs0, y0))
    # a second batch in the same epoch still reads the (empty) previous epoch
    outs0b, y0b, out = step(m, 2, [6, 7])
    torch.testing.assert_close(out.terms["di/0"], stock_di(models, m, outs0b, y0b))
    m.end_epoch(0)

    # epoch 1: samples 2..7 were seen in epoch 0, 8 and 9 never (one-hot for those)
    m.start_epoch(1, epochs)
    assert m.adm.delta.item() == pytest.approx(kd_delta(1, epochs))
    seen0 = {i: torch.softmax(outs0[0].logits[i].detach(), 0) for i in range(6)}
    seen0.update({6 + i: torch.softmax(outs0b[0].logits[i].detach(), 0) for i in range(2)})
    batch = [2, 3, 4, 5, 6, 7, 8, 9]
    outs1, y1, out = step(m, 3, batch)
    prev = torch.stack([seen0.get(i, torch.zeros(K, dtype=torch.float64)) for i in batch])
    delta = torch.tensor([[kd_delta(1, epochs) if i in seen0 else 0.0] for i in batch], dtype=torch.float64)
    torch.testing.assert_close(out.terms["di/0"], stock_di(models, m, outs1, y1, prev, delta))
    m.end_epoch(1)

    # epoch 2: only what epoch 1 wrote is valid; samples 0, 1 (epoch 0 only) fall back to one-hot
    m.start_epoch(2, epochs)
    probs, d = m.adm.previous(0, torch.arange(N))
    assert d.squeeze(1).tolist() == [0.0, 0.0] + [pytest.approx(0.6)] * 8
    torch.testing.assert_close(probs[2:], torch.softmax(outs1[0].logits.detach(), 1))
    # the state (both halves, the flags, parity, delta) is in the state_dict: resume is exact
    _, fresh = make()
    fresh.load_state_dict(m.state_dict())
    p2, d2 = fresh.adm.previous(0, torch.arange(N))
    torch.testing.assert_close(p2, probs)
    torch.testing.assert_close(d2, d)


def test_swap_is_device_side_and_writes_go_to_the_other_half():
    models, m = make(num_samples=4)
    m.start_epoch(0, 2)
    assert m.adm.parity.item() == 0
    outs, y, _ = step(m, 5, [1, 3])
    buf, valid = m.adm.prev_probs_0, m.adm.prev_valid_0
    assert valid.tolist() == [0, 0, 0, 0, 0, 1, 0, 1]  # rows N + index: the write half
    torch.testing.assert_close(buf[[5, 7]], torch.softmax(outs[0].logits.detach(), 1))
    ptr = buf.data_ptr()
    m.end_epoch(0)
    assert m.adm.parity.item() == 1 and buf.data_ptr() == ptr == m.adm.prev_probs_0.data_ptr()
    # now reads come from rows 4..7, writes go to rows 0..3 (flags of that half cleared)
    step(m, 6, [0])
    assert valid.tolist() == [1, 0, 0, 0, 0, 1, 0, 1]
    m.end_epoch(1)
    assert m.adm.parity.item() == 0 and valid.tolist() == [1, 0, 0, 0, 0, 0, 0, 0]


def test_buffer_dtype_and_eval_mode():
    half = build_method("dml+adm", [FakeNet(T_CH), FakeNet(S_CH)], roles=("teacher", "student"),
                        num_classes=K, num_samples=N, adm={"di": "kd", "buffer_dtype": "bfloat16"})
    assert half.adm.prev_probs_0.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="buffer_dtype must be one of"):
        make(buffer_dtype="int8")
    models, m = make()
    m.eval()  # no recording outside training
    step(m, 1, [0, 1])
    assert m.adm.prev_valid_0.sum() == 0
