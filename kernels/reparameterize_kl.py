"""Reparameterize + KL to N(0, I) in one op: z = mean + exp(log_sigma) * eps, and KL per row.

The PyTorch formula here is the implementation on every device for now, and the twin a Triton kernel
must match.
"""

from __future__ import annotations

import torch


def reparameterize_kl_torch(
    mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean, log_sigma, eps: (B, Z). Returns z (B, Z) in mean's dtype and KL (B,) in fp32.

    Arithmetic is fp32 whatever the input dtype. KL is the closed form of Kingma & Welling (2014),
    appendix B: KL(N(mean, sigma^2) || N(0, 1)) = sum_z 1/2 (sigma^2 + mean^2 - 1) - log sigma.
    """
    mean32 = mean.float()
    log_sigma32 = log_sigma.float()
    sigma = log_sigma32.exp()
    z = mean32 + sigma * eps.float()
    kl = (0.5 * (sigma * sigma + mean32 * mean32 - 1.0) - log_sigma32).sum(-1)
    return z.to(mean.dtype), kl
