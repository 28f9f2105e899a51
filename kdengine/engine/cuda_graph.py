"""Capture the whole joint step (forwards, losses, backward, optimizer step) once per input
shape as a CUDA graph and replay it (PyTorch's whole-network capture recipe).

Each input shape (a resolution change, a last partial batch) first runs ``warmup`` eager calls
on a side stream (they are real training steps: they allocate the optimizer's momentum buffers
and let cuDNN pick its algorithms for that shape), then one call is captured, and every later
call with that shape copies the batch into the graph's static inputs and replays. The learning
rate must live in a device tensor (the engine does that on CUDA) and the method keeps its
schedules in buffers, so replays follow the schedule.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Inputs = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class CapturedStep:
    """``step(images, labels, indices) -> dict of tensors``, captured per input shape.

    Args:
        step: the eager step; it must be capturable (no host syncs, static shapes).
        warmup: eager calls of each shape before its capture.
    """

    def __init__(self, step: Callable, warmup: int = 3):
        self.step = step
        self.warmup = warmup
        self.warmups: dict[tuple, int] = {}  # input shapes -> eager calls so far
        self.graphs: dict[tuple, tuple] = {}  # input shapes -> (graph, static inputs, static outputs)
        self.pool = None  # one memory pool for all shapes' graphs

    @staticmethod
    def _key(*tensors) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.stride()) if t is not None else None for t in tensors)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor]):
        inputs = (images, labels, indices)
        key = self._key(*inputs)
        if key in self.graphs:
            return self._replay(key, inputs)
        done = self.warmups.get(key, 0)
        if done < self.warmup:
            self.warmups[key] = done + 1
            return self._eager(inputs)
        self.graphs[key] = self._capture(inputs)
        graph, _, static_out = self.graphs[key]
        graph.replay()  # capture records without running: this call's step happens here
        return {k: v.clone() for k, v in static_out.items()}

    def _eager(self, inputs: Inputs) -> dict:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, inputs: Inputs) -> tuple:
        """``(graph, static inputs, static outputs)`` of one captured step on copies of ``inputs``."""
        static_in = tuple(t.clone() if t is not None else None for t in inputs)
        graph = torch.cuda.CUDAGraph()
        # Gradients are allocated inside the graph's private pool, as the capture recipe requires.
        # thread_local: CUDA work other threads issue meanwhile (FFCV's loader thread copying the
        # next batch) is not part of this capture and does not invalidate it.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.step(*static_in)
        self.pool = graph.pool()
        return graph, static_in, static_out

    def _replay(self, key: tuple, inputs: Inputs) -> dict:
        graph, static_in, static_out = self.graphs[key]
        for buffer, value in zip(static_in, inputs):
            if buffer is not None:
                buffer.copy_(value, non_blocking=True)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}
