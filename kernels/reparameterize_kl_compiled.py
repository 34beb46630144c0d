"""The sampled reparameterize + KL's PyTorch path as two compiled graphs, forward and backward, behind one
autograd.Function: for the op called on its own. A compiled training step traces the plain formula instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from fastvae.kernels.reparameterize_kl_torch import (
    reparameterize_kl_backward_torch,
    reparameterize_kl_torch,
    sample_eps_torch,
)


def _forward(
    mean: torch.Tensor, log_sigma: torch.Tensor, seed_offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (B, Z), KL (B,) and the eps (B, Z) fp32 they were drawn with, which the backward reads."""
    eps = sample_eps_torch(seed_offset, mean.shape)
    return (*reparameterize_kl_torch(mean, log_sigma, eps), eps)


@functools.cache
def _compiled() -> tuple[Callable[..., tuple[torch.Tensor, ...]], Callable[..., tuple[torch.Tensor, ...]]]:
    """(forward, backward), compiled on first use, not at import: torch.compile's first call in a process turns
    off torch.distributions' argument checks everywhere (torch._dynamo's TorchPatcher), which the lab's code
    then runs without (~30% faster at B=1024, Z=32)."""
    # NOTE: torch.compile of the whole sampled function took 318 us at B=1024, Z=32 in full mode (2-core
    # Xeon): AOTAutograd's partitioner draws eps again in the backward rather than saving it, and its wrappers
    # cost more per call. These two graphs, with eps saved, took 244 us (276 us drawing eps again).
    return (torch.compile(_forward, fullgraph=True, dynamic=False),
            torch.compile(reparameterize_kl_backward_torch, fullgraph=True, dynamic=False))


class _Sampled(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, mean: torch.Tensor, log_sigma: torch.Tensor, seed_offset: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z, kl, eps = _compiled()[0](mean, log_sigma, seed_offset)
        ctx.save_for_backward(mean, log_sigma, eps)
        return z, kl

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dz: torch.Tensor, dkl: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mean, log_sigma, eps = ctx.saved_tensors
        return (*_compiled()[1](dz, dkl, mean, log_sigma, eps), None)


def reparameterize_kl_sampled_compiled(
    mean: torch.Tensor, log_sigma: torch.Tensor, seed_offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """reparameterize_kl_sampled(..., kernel='torch') with its forward and backward compiled: the same formula
    and eps, to fp32 rounding (inductor's log, cos and sums may differ in the last bit).

    mean, log_sigma (B, Z); seed_offset int64 [seed, offset]. Returns z (B, Z) in mean's dtype, KL (B,) fp32.
    Each new shape, dtype or stride compiles (seconds). Inside a compiled region, the plain formula is traced.
    """
    if torch.compiler.is_compiling():
        return _forward(mean, log_sigma, seed_offset)[:2]
    return _Sampled.apply(mean, log_sigma, seed_offset)
