"""curves.png: one colour per model in every panel, the training loss on its own axis, readable
after one epoch."""
import pytest

from kdengine.viz import curves


def _records(epochs):
    out = []
    for e in range(epochs):
        out.append({"epoch": e, "split": "train", "loss": 5.0 - e})
        out.append({"epoch": e, "split": "val", **{f"{m}/top1": 20.0 + e for m in ("teacher", "student", "ensemble")},
                    **{f"{m}/loss": 1.3 - 0.1 * e for m in ("teacher", "student", "ensemble")}})
    return out


@pytest.fixture
def figure(monkeypatch, tmp_path):
    """The figure plot_curves draws (then written as usual)."""
    drawn = {}
    save = curves.save

    def lines(ax):
        return [(line.get_label(), line.get_color(), line.get_marker(), list(line.get_xdata()))
                for line in ax.get_lines()]

    def keep(fig, path):
        drawn["axes"] = [(ax.get_title(), lines(ax), [t.get_text() for t in ax.texts]) for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(curves, "save", keep)
    return drawn


@pytest.mark.parametrize("epochs", [1, 3])
def test_curves_colours_axes_and_markers(figure, tmp_path, epochs):
    path = curves.plot_curves(_records(epochs), tmp_path / "curves.png")
    assert path.stat().st_size > 1000
    (acc_title, acc, acc_texts), (ce_title, ce, _), (loss_title, loss, _) = figure["axes"]
    assert acc_title == "validation accuracy" and ce_title == "validation cross-entropy"
    assert "training loss" in loss_title and [label for label, *_ in loss] == ["total (all models and terms)"]
    colour = {label: c for label, c, _, _ in acc}
    assert [label for label, *_ in acc] == ["teacher", "student", "ensemble"]
    assert {label: c for label, c, _, _ in ce} == colour and len(set(colour.values())) == 3
    assert all(marker == "o" for _, _, marker, _ in acc + ce + loss)
    if epochs == 1:  # equal values stay apart, each labelled
        assert len({xs[0] for *_, xs in acc}) == 3 and acc_texts == ["20.00"] * 3
    else:
        assert all(xs == [1, 2, 3] for *_, xs in acc) and not acc_texts
