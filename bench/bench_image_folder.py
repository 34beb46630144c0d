"""A folder of the user's own images into the trainer's uint8 tensor: the cold decode (every core, no cache yet) and
the warm load from the cache, in images/s and images/s per core, on a synthetic folder of 28-48 px PNGs and JPEGs."""

from __future__ import annotations

import itertools
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import pytest
from PIL import Image

from fastvae.images import load_image_source

FULL, QUICK = 50_000, 2_000  # images when timed (--benchmark-enable), and in the suite's untimed run
PER_FOLDER = 1_000  # images per subfolder, as a photo collection might hold them


def _write_folder(folder: Path, count: int) -> Path:
    """`count` random-noise images (the worst case for both codecs): 28-48 px a side, half PNG, half JPEG, half
    grayscale, half colour, so the folder is colour and every decoder path runs."""
    rng = np.random.default_rng(0)
    for i in range(count):
        height, width = (int(side) for side in rng.integers(28, 49, size=2))
        shape = (height, width, 3) if i % 2 else (height, width)
        path = folder / f"{i // PER_FOLDER:03d}" / f"{i:06d}.{'png' if i % 4 < 2 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The synthetic folder of `count` images, written once a session (50,000 take ~20 s on 2 cores)."""
    folders: dict[int, Path] = {}

    def get(count: int) -> Path:
        if count not in folders:
            folders[count] = _write_folder(tmp_path_factory.mktemp(f"image-folder-{count}"), count)
        return folders[count]

    return get


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the pool's workers, once it has shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cold", "warm"])
def test_image_folder(benchmark: Any, mode: str, image_folder: Callable[[int], Path], tmp_path: Path,
                      machine: dict) -> None:
    count = QUICK if benchmark.disabled else FULL
    folder, workers = image_folder(count), os.cpu_count() or 1
    caches = (tmp_path / f"cache-{i}" for i in itertools.count())
    info: dict[str, Any] = {}

    def load(cache_dir: Path, cached: bool) -> None:
        loaded = load_image_source(folder, cache_dir=cache_dir, progress=False, workers=workers)
        assert loaded.images.shape == (count, 3, 28, 28) and ("cached" in loaded.description) == cached

    benchmark.group = f"image folder, {count:,} images"
    if mode == "cold":
        # One round (each needs a fresh cache folder); the files themselves are in the page cache, just written.
        cpu_before = _cpu_s()
        benchmark.pedantic(load, setup=lambda: ((next(caches), False), {}), rounds=1, iterations=1)
        info["cpu_s"] = round(_cpu_s() - cpu_before, 2)  # every process: what the decode costs the machine
    else:
        cache = next(caches)
        load(cache, False)  # fills the cache, untimed
        (cache_file,) = (cache / "images").glob("*.npy")
        start = time.perf_counter()
        np.load(cache_file)
        info["np_load_s"] = round(time.perf_counter() - start, 4)  # the floor a warm load is measured against
        benchmark(load, cache, True)

    benchmark.extra_info.update(mode=mode, images=count, workers=workers, pillow=PIL.__version__,
                                numpy=np.__version__, **info, **machine)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    median = stats.stats.median
    benchmark.extra_info.update(seconds=round(median, 3), images_per_s=round(count / median),
                                images_per_s_per_core=round(count / median / workers))
    if "cpu_s" in info:
        benchmark.extra_info["images_per_cpu_s"] = round(count / info["cpu_s"])
