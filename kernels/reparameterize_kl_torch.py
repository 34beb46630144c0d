"""Reparameterize + KL as plain PyTorch: the formula every implementation is tested against, and its gradients.
Torch-only (no Triton), so it runs where torch ships no Triton; eps comes from counter_normal (`sample_eps_torch`)."""

from __future__ import annotations

import torch

from fastvae.kernels.counter_normal import counter_normal


def sample_eps_torch(seed_offset: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Standard-normal eps (shape) in fp32 on seed_offset's device, determined by (seed, offset).

    counter_normal's numbers, not Triton's: the same counters (offset + row-major index), another generator.
    Reads nothing on the host, so it runs inside a compiled graph.
    """
    return counter_normal(seed_offset, shape)


def reparameterize_kl_torch(
    mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean, log_sigma, eps: (B, Z). Returns z (B, Z) in mean's dtype and KL (B,) in fp32.

    Arithmetic is fp32 for fp32, bf16 and fp16 inputs (fp64 stays fp64, for gradcheck). KL is the closed
    form of Kingma & Welling (2014), appendix B:
    KL(N(mean, sigma^2) || N(0, 1)) = sum_z 1/2 (sigma^2 + mean^2 - 1) - log sigma.
    """
    compute = torch.promote_types(mean.dtype, torch.float32)
    mean_c, log_sigma_c = mean.to(compute), log_sigma.to(compute)
    sigma = log_sigma_c.exp()
    z = mean_c + sigma * eps.to(compute)
    kl = (0.5 * (sigma * sigma + mean_c * mean_c - 1.0) - log_sigma_c).sum(-1)
    return z.to(mean.dtype), kl


def reparameterize_kl_backward_torch(
    dz: torch.Tensor, dkl: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `reparameterize_kl_torch` in closed form: (d mean, d log_sigma), each (B, Z) in mean's
    dtype; the backward kernel's formula, and the CPU ops' backward."""
    compute = torch.promote_types(mean.dtype, torch.float32)
    mean_c, log_sigma_c, eps_c, dz_c = (t.to(compute) for t in (mean, log_sigma, eps, dz))
    dkl_c = dkl.to(compute)[:, None]  # (B, 1)
    sigma = log_sigma_c.exp()
    dmean = dz_c + dkl_c * mean_c
    dlog_sigma = dz_c * eps_c * sigma + dkl_c * (sigma * sigma - 1.0)
    return dmean.to(mean.dtype), dlog_sigma.to(log_sigma.dtype)
