"""Public ops of fastvae and the choice of implementation behind each."""

from __future__ import annotations

import torch

from fastvae.kernels.reparameterize_kl import reparameterize_kl_torch


def reparameterize_kl(
    mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """z = mean + exp(log_sigma) * eps (B, Z) in mean's dtype, and KL(q || N(0, I)) per row (B,) in fp32."""
    return reparameterize_kl_torch(mean, log_sigma, eps)


__all__ = ["reparameterize_kl"]
