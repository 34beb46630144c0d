"""The whole training step (forward, backward, Adam) captured once as a CUDA graph and replayed every step: a small
model's GPU step is mostly launch overhead, and one replay launches all of its kernels at once."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Uncaptured steps before the capture: PyTorch's recipe uses a few, so that lazy initialization is done.
WARMUP_STEPS = 3


class GraphedStep:
    """`step(images, seed_offset)` as `train_step(images, seed_offset)` does, replayed from one CUDA graph.

    As PyTorch's whole-network capture recipe has it: the first WARMUP_STEPS run uncaptured on a side stream, the
    next one is captured and replayed, the rest are replayed. Adam must be built with capturable=True. The returned
    loss tensor is the graph's own output buffer: read it (or copy it) before the next step.
    """

    def __init__(self, train_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.train_step = train_step
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.images: torch.Tensor | None = None
        self.seed_offset: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor, seed_offset: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.steps <= WARMUP_STEPS:
            # Real steps of the run; they warm up cuBLAS, autograd and the optimizer state before the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.train_step(images, seed_offset)
            torch.cuda.current_stream().wait_stream(side)
            loss.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
            return loss
        if self.graph is None:
            self.images, self.seed_offset = images.clone(), seed_offset.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self.train_step(self.images, self.seed_offset)
        else:
            # The graph reads its inputs from static buffers: this step's batch and [seed, offset] pair are copied
            # in, so each replay draws fresh eps, from the pair.
            self.images.copy_(images)
            self.seed_offset.copy_(seed_offset)
        self.graph.replay()
        return self.loss
