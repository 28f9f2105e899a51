"""Capture the whole joint step (forwards, losses, backward, optimizer step) once per input
shape as a CUDA graph and replay it (PyTorch's whole-network capture recipe).

Each loader batch is copied into static input buffers; the first ``warmup`` calls run eagerly
on a side stream (they are real training steps: they allocate the optimizer's momentum buffers
and let cuDNN pick its algorithms), then one call is captured, and every later call replays.
The learning rate must live in a device tensor (the engine does that on CUDA) and the method
keeps its schedules in buffers, so replays follow the schedule.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class CapturedStep:
    def __init__(self, step: Callable, warmup: int = 3):
        self.step = step
        self.warmup = warmup
        self.calls = 0
        self.graphs: dict[tuple, tuple] = {}  # input shapes -> (graph, static inputs, static outputs)
        self.pool = None

    @staticmethod
    def _key(*tensors) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.stride()) if t is not None else None for t in tensors)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor]):
        key = self._key(images, labels, indices)
        if key in self.graphs:
            graph, static_in, static_out = self.graphs[key]
            for buffer, value in zip(static_in, (images, labels, indices)):
                if buffer is not None:
                    buffer.copy_(value, non_blocking=True)
            graph.replay()
            return {k: v.clone() for k, v in static_out.items()}
        if self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(images, labels, indices)
            torch.cuda.current_stream().wait_stream(side)
            return out
        static_in = tuple(t.clone() if t is not None else None for t in (images, labels, indices))
        graph = torch.cuda.CUDAGraph()
        # Gradients are allocated inside the graph's private pool, as the capture recipe requires.
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.step(*static_in)
        self.pool = graph.pool()
        self.graphs[key] = (graph, static_in, static_out)
        graph.replay()  # capture records without running: this call's step happens here
        return {k: v.clone() for k, v in static_out.items()}
