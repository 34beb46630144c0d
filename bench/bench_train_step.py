"""Training step (forward + backward + Adam) at batch 1024 on real Fashion-MNIST, every path side by side."""

from __future__ import annotations

import time

import pytest
import torch

from bench.conftest import record_throughput
from fastvae.config import ModelConfig
from fastvae.data import FASHION_MNIST_DIR, load_images, to_float
from fastvae.flops import train_step_flops
from fastvae.train import build_model, make_loss_fn, train_step

BATCH = 1024
PATHS = {  # name: (model, compile, amp)
    "reference-eager": ("reference", False, False),
    "fastvae-eager": ("fast", False, False),
    "fastvae-compile": ("fast", True, False),
    "fastvae-compile-amp": ("fast", True, True),
}


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
    return to_float(load_images("fashion-mnist", "train")[:BATCH])


@pytest.mark.parametrize("path", list(PATHS))
def test_train_step(benchmark, path: str, batch: torch.Tensor, matmul_gflops: float, machine: dict) -> None:
    kind, compiled, amp = PATHS[path]
    torch.manual_seed(0)
    config = ModelConfig()
    model = build_model(kind, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = make_loss_fn(model, kind, 1.0, torch.bfloat16 if amp else None)
    if compiled:
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    eps = torch.randn(BATCH, config.z_dim)

    start = time.perf_counter()
    train_step(loss_fn, batch, eps, optimizer, scaler)  # the first step compiles: timed on its own
    first_step_s = time.perf_counter() - start

    benchmark.group = "train-step batch 1024"
    benchmark.pedantic(train_step, args=(loss_fn, batch, eps, optimizer, scaler), rounds=10, warmup_rounds=1)
    record_throughput(benchmark, flops=train_step_flops(config) * BATCH, items=BATCH, ceiling=matmul_gflops,
                      path=path, first_step_s=round(first_step_s, 2), dtype="bf16" if amp else "fp32",
                      **machine)
