"""Public ops of fastvae.kernels: reparameterize + KL, by the PyTorch formula (everywhere) or the Triton kernels."""

from __future__ import annotations

import torch

from fastvae.kernels.reparameterize_kl_compiled import reparameterize_kl_sampled_compiled
from fastvae.kernels.reparameterize_kl_torch import reparameterize_kl_torch, sample_eps_torch


def triton_installed() -> bool:
    """Whether Triton imports here (torch ships it for Linux only; a broken install counts as missing)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def load_triton_kernels() -> None:
    """Register the Triton ops as torch.ops.fastvae.* (once); needs Triton installed.

    `fastvae.model.VAE(kernel="triton")` calls it, the kernel a run plan (fastvae.plan) picks on CUDA with Triton;
    nothing else in the package imports the Triton module, so it works where torch ships no Triton (macOS, Windows).
    """
    import fastvae.kernels.reparameterize_kl_triton  # noqa: F401  (registration is the import's effect)


def reparameterize_kl(
    mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor, kernel: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """z = mean + exp(log_sigma) * eps (B, Z) in mean's dtype, and KL(q || N(0, I)) per row (B,) in fp32.

    kernel 'triton' needs load_triton_kernels() first and CUDA tensors; 'torch' is the PyTorch formula.
    """
    if kernel == "triton":
        return torch.ops.fastvae.reparameterize_kl(mean, log_sigma, eps)
    return reparameterize_kl_torch(mean, log_sigma, eps)


def reparameterize_kl_sampled(
    mean: torch.Tensor, log_sigma: torch.Tensor, seed_offset: torch.Tensor, kernel: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `reparameterize_kl`, with eps (B, Z) drawn from seed_offset = int64 tensor [seed, offset].

    Triton draws eps in the kernel (never stored); the PyTorch path draws other numbers from the same counters
    (`sample_eps_torch`). Neither reads the pair on the host: torch.compile traces into both.
    """
    if kernel == "triton":
        return torch.ops.fastvae.reparameterize_kl_sampled(mean, log_sigma, seed_offset)
    return reparameterize_kl_torch(mean, log_sigma, sample_eps_torch(seed_offset, mean.shape))


__all__ = ["load_triton_kernels", "reparameterize_kl", "reparameterize_kl_sampled",
           "reparameterize_kl_sampled_compiled", "sample_eps_torch", "triton_installed"]
