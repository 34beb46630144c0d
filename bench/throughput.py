"""GFLOP/s bookkeeping for benchmarks: throughput and the fraction of the machine's matmul ceiling."""

from __future__ import annotations

from typing import Any


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
