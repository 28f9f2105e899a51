"""ECE and reliability diagrams on probabilities whose answers are known by hand."""
import math

import pytest
import torch

from kdengine.viz.calibration import (
    calibration_bins,
    ece_from_bins,
    expected_calibration_error,
    plot_reliability,
    reliability,
)


def _probs(confidences, classes=4):
    """Rows whose top probability (class 0) is the given confidence, the rest spread evenly."""
    rows = []
    for c in confidences:
        rest = (1 - c) / (classes - 1)
        rows.append([c] + [rest] * (classes - 1))
    return torch.tensor(rows, dtype=torch.float64)


def test_perfectly_calibrated_is_zero():
    # 10 predictions at confidence 0.8, 8 of them right
    probs = _probs([0.8] * 10)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-9)


def test_overconfident_by_hand():
    # bin of 0.95 (4 samples, 2 right): gap 0.45; bin of 0.55 (6 samples, all right): gap 0.45
    probs = _probs([0.95] * 4 + [0.55] * 6)
    labels = torch.tensor([0, 0, 1, 1] + [0] * 6)
    expected = 100 * (4 / 10 * abs(0.5 - 0.95) + 6 / 10 * abs(1.0 - 0.55))
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_gaps_of_opposite_sign_in_one_bin_cancel_but_not_across_bins():
    # same bin (15 bins: 0.60 and 0.62 both in [0.6, 0.667)): one right, one wrong -> |1 - 1.22| / 2
    probs = _probs([0.60, 0.62])
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(100 * abs(1 - 1.22) / 2)
    # with 2 bins of their own they do not cancel
    probs = _probs([0.30, 0.95])
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(100 * (0.7 + 0.95) / 2)


def test_bins_are_additive_over_batches():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(300, 10) * 3, dim=1)
    labels = torch.randint(0, 10, (300,))
    whole = calibration_bins(probs, labels)
    parts = calibration_bins(probs[:100], labels[:100]) + calibration_bins(probs[100:], labels[100:])
    assert torch.allclose(whole, parts)
    assert whole[:, 0].sum() == 300
    assert ece_from_bins(whole) == pytest.approx(expected_calibration_error(probs, labels))


def test_confidence_one_falls_in_the_last_bin():
    sums = calibration_bins(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), bins=15)
    assert sums[14, 0] == 1 and sums[:14, 0].sum() == 0


def test_reliability_numbers_and_diagram(tmp_path):
    probs = _probs([0.95] * 4 + [0.55] * 6)
    labels = torch.tensor([0, 0, 1, 1] + [0] * 6)
    d = reliability(calibration_bins(probs, labels, bins=10))
    assert d["count"][9] == 4 and d["count"][5] == 6 and sum(d["count"]) == 10
    assert d["accuracy"][9] == pytest.approx(0.5) and d["confidence"][9] == pytest.approx(0.95)
    assert d["accuracy"][5] == pytest.approx(1.0) and d["confidence"][5] == pytest.approx(0.55)
    assert math.isnan(d["accuracy"][0])  # empty bin
    assert d["ece"] == pytest.approx(45.0)
    path = plot_reliability({"student": d, "ensemble": d}, tmp_path / "r.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        calibration_bins(torch.rand(4), torch.zeros(4, dtype=torch.long))
