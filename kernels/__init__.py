"""Public ops of fastvae and the choice of implementation behind each: Triton on CUDA, PyTorch elsewhere."""

from __future__ import annotations

import torch

from fastvae.kernels.reparameterize_kl import reparameterize_kl_torch, sample_eps_torch
from fastvae.kernels.reparameterize_kl_compiled import reparameterize_kl_sampled_compiled

KERNELS = ("auto", "triton", "torch")


def resolve_kernel(kernel: str, device: torch.device | str) -> tuple[str, str]:
    """'auto' | 'triton' | 'torch' for tensors on `device` -> ('triton' or 'torch', the reason, for logs).

    Raises ValueError for an unknown name, or for 'triton' off CUDA: the kernels have no CPU backend, and
    inside torch.compile a Triton op on CPU tensors fails, so CPU always gets the PyTorch formula.
    """
    device_type = torch.device(device).type
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "torch":
        return "torch", "asked for"
    if device_type == "cuda":
        return "triton", "asked for" if kernel == "triton" else "auto: CUDA tensors"
    if kernel == "triton":
        raise ValueError(f"the Triton kernels need CUDA tensors, these are on {device_type}; use auto or torch")
    return "torch", f"auto: {device_type} tensors; the Triton kernels run on CUDA only"


def reparameterize_kl(
    mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor, kernel: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """z = mean + exp(log_sigma) * eps (B, Z) in mean's dtype, and KL(q || N(0, I)) per row (B,) in fp32.

    With eps given this is the parity and evaluation path, so it stays on the PyTorch twin unless asked.
    """
    if resolve_kernel(kernel, mean.device)[0] == "triton":
        return torch.ops.fastvae.reparameterize_kl(mean, log_sigma, eps)
    return reparameterize_kl_torch(mean, log_sigma, eps)


def reparameterize_kl_sampled(
    mean: torch.Tensor, log_sigma: torch.Tensor, seed_offset: torch.Tensor, kernel: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `reparameterize_kl`, with eps (B, Z) drawn from seed_offset = int64 tensor [seed, offset].

    Triton draws eps in the kernel (never stored); the PyTorch path draws other numbers from the same counters
    (fastvae.kernels.counter_normal). Neither reads the pair on the host: torch.compile traces into both.
    """
    if resolve_kernel(kernel, mean.device)[0] == "triton":
        return torch.ops.fastvae.reparameterize_kl_sample(mean, log_sigma, seed_offset)
    return reparameterize_kl_torch(mean, log_sigma, sample_eps_torch(seed_offset, mean.shape))


__all__ = ["KERNELS", "reparameterize_kl", "reparameterize_kl_sampled", "reparameterize_kl_sampled_compiled",
           "resolve_kernel"]
