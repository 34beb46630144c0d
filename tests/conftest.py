"""Shared fixtures: fresh seeds, tiny IDX datasets written on the fly, and the `cuda` marker's skip.

Plain helpers (TOLERANCES, relative_error, folder_snapshot) live in tests/helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvae.data import write_idx


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked `cuda` on a machine without a CUDA GPU: the one place that decides it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        # The marker, not item.keywords: those also hold parametrize ids, and an id may be "cuda".
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with a GPU, a test marked neither `cuda` nor `triton` runs as on one without, its subprocesses
    too: its `--device auto` is the CPU, whose runs repeat bit for bit (cuDNN's backward convolutions may sum in
    another order from run to run, so a GPU's do not)."""
    marked = any(request.node.get_closest_marker(name) for name in ("cuda", "triton"))
    if torch.cuda.is_available() and not marked:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """A new seed per test (printed on failure), so comparisons run on fresh random inputs every run."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


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
