"""Training step (forward + backward + Adam) at batch 1024 on real Fashion-MNIST, every path side by side.

`fastvae train` on the CPU makes glibc keep freed memory (fastvae/malloc.py), which speeds up the lab's code
too; the rows with "system-malloc" / "cached-malloc" separate that gain from the model's own. The reference row
runs first, with glibc's defaults, as the lab's code runs in a plain process.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from bench.conftest import record_throughput
from bench.memory import measure_in_child
from fastvae.config import ModelConfig
from fastvae.data import FASHION_MNIST_DIR, load_images, to_float
from fastvae.flops import train_step_flops
from fastvae.kernels import resolve_kernel
from fastvae.malloc import keep_freed_memory, return_freed_memory
from fastvae.train import build_model, make_loss_fn, train_step

BATCH = 1024
PATHS = {  # name: (model, compile, amp, CPU allocator)
    "reference-eager": ("reference", False, False, "system"),
    "reference-eager-cached-malloc": ("reference", False, False, "cached"),
    "fastvae-eager-system-malloc": ("fast", False, False, "system"),
    "fastvae-eager": ("fast", False, False, "cached"),
    "fastvae-amp": ("fast", False, True, "cached"),
    "fastvae-compile": ("fast", True, False, "cached"),
    "fastvae-compile-amp": ("fast", True, True, "cached"),
}


@contextlib.contextmanager
def cpu_allocator(path: str, device: torch.device) -> Iterator[None]:
    """The glibc malloc setting `path` trains with, for the duration of the block."""
    if device.type != "cpu" or PATHS[path][3] != "cached":
        yield
        return
    keep_freed_memory()
    try:
        yield
    finally:
        return_freed_memory()


def make_step(path: str, batch_size: int, device: torch.device) -> Callable[[], float]:
    """One training step of `path` on a fixed batch of real images, as `fastvae train` runs it."""
    kind, compiled, amp, _ = PATHS[path]
    torch.manual_seed(0)
    config = ModelConfig()
    images = to_float(load_images("fashion-mnist", "train")[:batch_size]).to(device)
    seed_offset = torch.tensor([0, 0], device=device)  # eps is drawn in the step, from this pair
    model = build_model(kind, config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    dtype = (torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16) if amp \
        else None
    kernel = resolve_kernel("auto", device)[0] if kind == "fast" else "torch"  # as `fastvae train` resolves it
    loss_fn = make_loss_fn(model, kind, 1.0, dtype, kernel)
    if compiled:
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    return functools.partial(train_step, loss_fn, images, seed_offset, optimizer, scaler)


@pytest.fixture(scope="module", autouse=True)
def _needs_fashion_mnist() -> None:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist")


@pytest.mark.parametrize("path", list(PATHS))
def test_train_step(benchmark, path: str, matmul_gflops: float, machine: dict) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with cpu_allocator(path, device):
        step = make_step(path, BATCH, device)
        start = time.perf_counter()
        step()  # the first step compiles: timed on its own
        first_step_s = time.perf_counter() - start

        benchmark.group = f"train-step batch {BATCH}"
        benchmark.pedantic(step, rounds=10, warmup_rounds=1)
        del step  # its tensors go back while this path's allocator setting holds
    # A fresh process per path; compiled paths would compile again, so they are measured only for real runs.
    memory = {} if benchmark.disabled and PATHS[path][1] else measure_in_child(path, BATCH)
    _, _, amp, allocator = PATHS[path]
    record_throughput(benchmark, flops=train_step_flops() * BATCH, items=BATCH, ceiling=matmul_gflops,
                      path=path, first_step_s=round(first_step_s, 2), dtype="bf16" if amp else "fp32",
                      cpu_allocator=allocator, device=str(device), **memory, **machine)
