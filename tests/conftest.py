"""Shared fixtures: fresh seeds, tolerances per dtype, tiny IDX datasets written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvae.data import write_idx

# Relative error allowed when a fast path is compared with the reference, by the dtype it computes in.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """A new seed per test (printed on failure), so comparisons run on fresh random inputs every run."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def _blobs(n: int, rng: np.random.Generator) -> np.ndarray:
    """n 28x28 uint8 images of bright rectangles on black: a learnable, MNIST-like toy set."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for image in images:
        top, left = rng.integers(2, 14, size=2)
        height, width = rng.integers(6, 13, size=2)
        image[top : top + height, left : left + width] = rng.integers(120, 256)
    return images


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with MNIST-format IDX files: 256 training and 64 test images (gzip and plain)."""
    folder = tmp_path_factory.mktemp("tiny-idx")
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", _blobs(256, rng))
    write_idx(folder / "t10k-images-idx3-ubyte", _blobs(64, rng))
    return folder
