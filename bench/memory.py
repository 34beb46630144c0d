"""Peak memory of training steps for one path, measured in a fresh process (CPU) or by the CUDA allocator.
Run directly: python -m bench.memory PATH BATCH
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.train_paths import make_step, path_plan, run_conditions
from fastvae.malloc import trim

STEPS = 3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(path: str, batch_size: int) -> dict[str, float]:
    """Run STEPS training steps of `path` (a key of bench.train_paths.PATHS) in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with run_conditions(path_plan(path, device)):
        return _measure(make_step(path, batch_size, device))


def _measure(step: Callable[[], float]) -> dict[str, float]:
    step()  # the first step compiles and allocates the optimizer state
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(STEPS):
            step()
        return {"peak_step_memory_mb": (torch.cuda.max_memory_allocated() - before) / 2**20, "kind": "cuda"}
    # On the CPU no allocator counts torch's tensors: the peak resident set size over the steps, minus the resident
    # size just before them.
    trim()  # what the first step left cached, so the delta below is a step's whole working set
    before = _rss_bytes()
    _reset_peak_rss()
    for _ in range(STEPS):
        step()
    return {"peak_step_memory_mb": max(0, _peak_rss_bytes() - before) / 2**20, "kind": "cpu-rss"}


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) here, so that the peak excludes imports, data loading and
    the first step: without it, the same step measured 314 MB alone and 651 MB late in a full bench run."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_in_child(path: str, batch_size: int) -> dict[str, float]:
    """`measure` in a fresh interpreter, so other paths' peaks do not count."""
    result = subprocess.run([sys.executable, "-m", "bench.memory", path, str(batch_size)], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).parents[1])
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
