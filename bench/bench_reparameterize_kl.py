"""Reparameterize + KL at B in {256, 1024, 8192}, Z in {32, 128}: forward, backward and full (both) modes.
Throughput is effective bandwidth, the bytes the op must move."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.distributions.normal import Normal

from fastvae import reference
from fastvae.config import TrainConfig
from fastvae.kernels import load_triton_kernels, reparameterize_kl_sampled, reparameterize_kl_sampled_compiled
from fastvae.plan import make_plan

SHAPES = [(batch, z_dim) for batch in (256, 1024, 8192) for z_dim in (32, 128)]
MODES = ("forward", "backward", "full")
# The lab's torch.distributions code, the fused PyTorch formula, that formula compiled (forward and backward graphs
# apart: reparameterize_kl_sampled_compiled), and the Triton op (CUDA only). Every path draws its own eps, as a
# training step does: rsample's torch.randn for the lab's code, counter_normal from a [seed, offset] tensor for the
# formula (inside the forward graph when compiled), Philox inside the kernel for Triton.
PATHS = ("reference-distributions", "torch-formula", "torch-formula-compile", "triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32


def _distributions(mean: torch.Tensor, log_sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = Normal(mean, log_sigma.exp())
    return q.rsample(), reference.kl_divergence_loss(q)


def _seed_offset() -> torch.Tensor:
    # One pair for every call: a training step passes a new one each step, which changes data, not work.
    return torch.tensor([0, 0], device=DEVICE)


def _op(path: str, batch: int, z_dim: int, benchmark: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    if path == "reference-distributions":
        return _distributions
    if path == "torch-formula":
        return functools.partial(reparameterize_kl_sampled, seed_offset=_seed_offset(), kernel="torch")
    if path == "torch-formula-compile":
        if benchmark.disabled and (batch, z_dim) != SHAPES[0]:
            pytest.skip("compiling takes seconds per shape on 2 cores: with --benchmark-disable only the smallest")
        torch.compiler.reset()
        # eps is drawn inside the forward graph by counter_normal's integer hash and Box-Muller, which inductor
        # fuses into the formula's loop (not torch.randn: inductor's own CPU randn measured 5x slower than
        # ATen's), and saved for the backward graph.
        return functools.partial(reparameterize_kl_sampled_compiled, seed_offset=_seed_offset())
    if make_plan(TrainConfig(device=DEVICE.type)).kernel != "triton":
        pytest.skip("the Triton kernels need a CUDA GPU and Triton; the run plan here picks the PyTorch formula")
    load_triton_kernels()
    return functools.partial(reparameterize_kl_sampled, seed_offset=_seed_offset(), kernel="triton")


def _bytes_moved(mode: str, batch: int, z_dim: int) -> int:
    """What the op must read and write: forward reads mean, log_sigma and writes z, KL (B,) fp32; backward
    reads dz, mean, log_sigma, dKL and writes d mean, d log_sigma. eps is drawn, never stored."""
    size, cells = DTYPE.itemsize, batch * z_dim
    forward, backward = 3 * cells * size + 4 * batch, 5 * cells * size + 4 * batch
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if "compile" in p else p for p in PATHS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch, z_dim", SHAPES, ids=str)
def test_reparameterize_kl(benchmark: Any, batch: int, z_dim: int, mode: str, path: str, machine: dict) -> None:
    op = _op(path, batch, z_dim, benchmark)
    generator = torch.Generator().manual_seed(batch * z_dim)
    encoding = torch.randn(batch, 2 * z_dim, generator=generator).to(DEVICE, DTYPE)
    mean = encoding[:, :z_dim].clone().requires_grad_(True)  # (B, Z)
    log_sigma = (0.5 * encoding[:, z_dim:]).requires_grad_(True)  # (B, Z)
    dz = torch.randn(batch, z_dim, generator=generator).to(DEVICE, DTYPE)
    dkl = torch.ones(batch, device=DEVICE)

    def sync() -> None:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # time the work, not the launch

    def forward() -> None:
        op(mean, log_sigma)
        sync()

    def full() -> None:
        torch.autograd.backward(op(mean, log_sigma), (dz, dkl))
        sync()

    torch.autograd.backward(op(mean, log_sigma), (dz, dkl))  # warm-up (and compiles forward and backward)
    outputs = op(mean, log_sigma)

    def backward() -> None:
        torch.autograd.backward(outputs, (dz, dkl), retain_graph=True)
        sync()

    benchmark.group = f"reparameterize_kl {mode} B={batch} Z={z_dim}"
    benchmark({"forward": forward, "backward": backward, "full": full}[mode])
    moved = _bytes_moved(mode, batch, z_dim)
    benchmark.extra_info.update(path=path, mode=mode, batch=batch, z_dim=z_dim, dtype=str(DTYPE), device=str(DEVICE),
                                bytes_per_call=moved, **machine)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None with --benchmark-disable
        benchmark.extra_info.update(rows_per_s=round(batch / stats.stats.median),
                                    gb_per_s=round(moved / stats.stats.median / 1e9, 2))
