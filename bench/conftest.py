"""Shared benchmark fixtures: the machine, its own fp32 matmul ceiling, and GFLOP/s bookkeeping.

Run: pytest bench --benchmark-json results/bench.json (CI: --benchmark-disable, each case runs once).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import pytest
import torch


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
    }


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


def record_throughput(benchmark: Any, *, flops: float, items: int, ceiling: float, **info: Any) -> None:
    """Put GFLOP/s, items/s and the fraction of the matmul ceiling into the benchmark's extra_info.

    `flops` and `items` are per call of the benchmarked function. Without timings (--benchmark-disable)
    only the static facts are recorded.
    """
    benchmark.extra_info.update(info, flops_per_call=flops, matmul_gflops=round(ceiling, 1))
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    median = stats.stats.median
    benchmark.extra_info.update(
        items_per_s=round(items / median, 1),
        gflops=round(flops / median / 1e9, 2),
        fraction_of_matmul=round(flops / median / 1e9 / ceiling, 3),
    )
