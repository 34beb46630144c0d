"""The training paths the benchmarks compare, each a set of `fastvae train` options, and one step of each built from
its run plan as `fastvae train` builds it: a plain module, so that bench_train_step (speed) and bench.memory (peak
memory, in a child process) share it without importing each other."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.distributions import Distribution

from fastvae.config import ModelConfig, RunPlan, TrainConfig
from fastvae.data import load_images, to_float
from fastvae.malloc import keep_freed_memory, return_freed_memory
from fastvae.plan import make_plan
from fastvae.step import build_step

# `fastvae train` on the CPU makes glibc keep freed memory (fastvae/malloc.py), which speeds up the lab's code too:
# the "system-malloc" / "cached-malloc" rows separate that gain from the model's own. The reference row comes first,
# with glibc's defaults, as the lab's code runs in a plain process.
PATHS: dict[str, dict[str, Any]] = {  # name: `fastvae train` options
    "reference-eager": {"model": "reference", "cpu_allocator": "system"},
    "reference-eager-cached-malloc": {"model": "reference"},
    "fastvae-eager-system-malloc": {"cpu_allocator": "system"},
    "fastvae-eager": {},
    "fastvae-amp": {"amp": True},
    "fastvae-compile": {"compile": True},
    "fastvae-compile-amp": {"compile": True, "amp": True},
}


def path_plan(path: str, device: torch.device) -> RunPlan:
    return make_plan(TrainConfig(device=device.type, **PATHS[path]))


@contextlib.contextmanager
def distribution_argument_checks() -> Iterator[None]:
    """torch.distributions checking its arguments, as the lab's code runs in a process of its own (Python's
    default), for the block: dynamo turns the checks off for the whole process at its first compile, and on a GPU
    each check reads the device."""
    validate = Distribution._validate_args
    Distribution.set_default_validate_args(__debug__)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(validate)


@contextlib.contextmanager
def run_conditions(plan: RunPlan) -> Iterator[None]:
    """The process-wide settings a run of `plan` trains under in a process of its own, for the block: glibc's
    malloc setting and torch.distributions' argument checks."""
    cached = plan.cpu_allocator == "cached"
    if cached:
        keep_freed_memory()
    try:
        with distribution_argument_checks():
            yield
    finally:
        if cached:
            return_freed_memory()


def make_step(path: str, batch_size: int, device: torch.device) -> Callable[[], float]:
    """One training step of `path` on a fixed batch of real images, built from its plan as `fastvae train` builds
    it; returns the loss as a float, so a timed call waits for the device."""
    step = build_step(path_plan(path, device), ModelConfig(), lr=2e-3, beta=1.0, seed=0, batch_size=batch_size)
    images = to_float(load_images("fashion-mnist", "train")[:batch_size]).to(device)
    return lambda: float(step(images))  # eps drawn in the step, from its own advancing counters
