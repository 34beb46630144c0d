"""Training step (forward + backward + Adam) at batch 1024 on real Fashion-MNIST, every path side by side."""

from __future__ import annotations

import time

import pytest
import torch

from bench.memory import measure_in_child
from bench.throughput import record_throughput
from bench.train_paths import PATHS, make_step, path_plan, run_conditions
from fastvae.data import FASHION_MNIST_DIR
from fastvae.flops import train_step_flops

BATCH = 1024
# Each case takes a few batch-1024 steps and a child process for the memory column even untimed, and the
# compiled ones compile: all slow but this one, which keeps make_step and bench.memory in the quick loop.
SMOKE_PATH = "fastvae-eager"


@pytest.fixture(scope="module", autouse=True)
def _needs_fashion_mnist() -> None:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist")


@pytest.mark.parametrize("path", [p if p == SMOKE_PATH else pytest.param(p, marks=pytest.mark.slow) for p in PATHS])
def test_train_step(benchmark, path: str, matmul_gflops: float, machine: dict) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with run_conditions(path_plan(path, device)):
        step = make_step(path, BATCH, device)
        start = time.perf_counter()
        step()  # the first step compiles: timed on its own
        first_step_s = time.perf_counter() - start

        benchmark.group = f"train-step batch {BATCH}"
        benchmark.pedantic(step, rounds=10, warmup_rounds=1)
        del step  # its tensors go back while this path's allocator setting holds
    # A fresh process per path; compiled paths would compile again, so they are measured only for real runs.
    plan = path_plan(path, device)
    memory = {} if benchmark.disabled and plan.compile else measure_in_child(path, BATCH)
    record_throughput(benchmark, flops=train_step_flops() * BATCH, items=BATCH, ceiling=matmul_gflops,
                      path=path, first_step_s=round(first_step_s, 2), plan=plan.describe(), **memory, **machine)
