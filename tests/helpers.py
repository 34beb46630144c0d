"""Helpers shared by test modules (plain functions and constants; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

# Relative error allowed when a fast path is compared with the reference, by the dtype it computes in.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too), by path relative to it: equal snapshots, identical trees."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
