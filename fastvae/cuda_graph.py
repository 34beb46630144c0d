"""The whole training step (forward, backward, Adam) captured once as a CUDA graph and replayed every step: a small
model's GPU step is mostly launch overhead, and one replay launches all of its kernels at once."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Uncaptured steps before the capture: PyTorch's recipe uses a few, so that lazy initialization is done.
WARMUP_STEPS = 3


class GraphedStep:
    """`step(images)` as `train_step(images)` does, replayed from one CUDA graph.

    As PyTorch's whole-network capture recipe has it: the first WARMUP_STEPS run uncaptured on a side stream, the
    next one is captured and replayed, the rest are replayed. Adam must be built with capturable=True, and every
    other tensor the step reads or updates (its eps counters, its loss tally) must stay the same tensor from step
    to step, updated in place. The returned loss tensor is the graph's own output buffer: read it (or copy it)
    before the next step.
    """

    def __init__(self, train_step: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.train_step = train_step
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.images: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None

    def steps_to_capture(self) -> int:
        """Calls left up to and including the capture (0 once captured)."""
        return 0 if self.graph is not None else WARMUP_STEPS + 1 - self.steps

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.steps <= WARMUP_STEPS:
            # Real steps of the run; they warm up cuBLAS, autograd and the optimizer state before the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.train_step(images)
            torch.cuda.current_stream().wait_stream(side)
            loss.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
            return loss
        if self.graph is None:
            self.images = images.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self.train_step(self.images)
        else:
            self.images.copy_(images)  # the graph reads its batch from this static buffer
        self.graph.replay()
        return self.loss
