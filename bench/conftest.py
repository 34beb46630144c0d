"""Shared benchmark fixtures: the machine and its own fp32 matmul ceiling (GFLOP/s bookkeeping: bench/throughput.py).
Run: make bench; without --benchmark-enable (pyproject's default is --benchmark-disable) each case runs once, untimed.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every benchmark is `slow`: `pytest -m "not slow"`, the developer's quick loop, runs the tests alone."""
    for item in items:
        if item.path.is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.slow)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope="session")
def machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": _installed("triton"),
    }


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(autouse=True)
def distributions_checks_as_torch_ships_them() -> None:
    """The lab's code runs with torch.distributions' argument checks, torch's default. torch.compile's first call
    in a process turns them off for the whole process (torch._dynamo's TorchPatcher), so without this the
    reference rows' speed would depend on whether an earlier case compiled something (0.90 against 0.61 ms
    for reparameterize + KL at B=1024, Z=32 on a 2-core Xeon). Each case starts from the default."""
    torch.distributions.Distribution.set_default_validate_args(__debug__)


@pytest.fixture(scope="session")
def matmul_gflops(request: pytest.FixtureRequest) -> float:
    """This machine's fp32 matmul speed (2048^3, median of 5; 1 when benchmarks are disabled)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    repeats = 1 if request.config.getoption("benchmark_disable") else 5
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9
