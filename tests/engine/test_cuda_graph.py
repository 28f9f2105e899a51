"""CapturedStep's bookkeeping on the CPU: the CUDA parts (side-stream eager call, capture, replay)
are replaced by recording stand-ins; the warm-up counting, the per-shape graphs and the copying
of each batch into the static inputs are the real code's."""
import torch

from kdengine.engine.cuda_graph import CapturedStep


class _Graph:
    """A captured step stand-in: replay runs the step on the static inputs into the static outputs."""

    def __init__(self, step, static_in, static_out):
        self.step, self.static_in, self.static_out = step, static_in, static_out

    def replay(self):
        for key, value in self.step(*self.static_in).items():
            self.static_out[key].copy_(value)


class _Recording(CapturedStep):
    def __init__(self, step, warmup):
        super().__init__(step, warmup)
        self.events = []

    def _eager(self, inputs):
        self.events.append(("eager", len(inputs[0])))
        return self.step(*inputs)

    def _capture(self, inputs):
        self.events.append(("capture", len(inputs[0])))
        static_in = tuple(t.clone() if t is not None else None for t in inputs)
        static_out = {k: torch.empty_like(v) for k, v in self.step(*static_in).items()}
        return _Graph(self.step, static_in, static_out), static_in, static_out


def _batch(size, value):
    return torch.full((size, 3), float(value)), torch.full((size,), value), None


def _step(images, labels, indices):
    return {"sum": images.sum(), "labels": labels.sum()}


def test_every_input_shape_is_warmed_up_before_its_capture():
    captured = _Recording(_step, warmup=2)
    calls = [(8, 1), (8, 2), (8, 3), (8, 4), (4, 5), (4, 6), (8, 7), (4, 8), (4, 9)]
    for size, value in calls:
        out = captured(*_batch(size, value))
        # every call's result is of its own batch (replays see the new inputs)
        assert out["sum"].item() == 3 * size * value and out["labels"].item() == size * value
    assert captured.events == [("eager", 8), ("eager", 8), ("capture", 8),  # the 4th 8-batch replays
                               ("eager", 4), ("eager", 4), ("capture", 4)]  # a new shape warms up again
    assert len(captured.graphs) == 2
    assert sorted(captured.warmups.values()) == [2, 2]  # counted per shape, each to its warm-up


def test_no_warmup_captures_at_once():
    captured = _Recording(_step, warmup=0)
    captured(*_batch(2, 1))
    captured(*_batch(2, 2))
    assert captured.events == [("capture", 2)]
