"""A run's training and test images, from a dataset name (its own test split) or the user's own images (a folder
or an array, with a held-out fraction drawn by the seed, or a test source of its own)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastvae.config import DATASETS, TrainConfig
from fastvae.data import load_images
from fastvae.errors import FastVAEError
from fastvae.seeds import SPLIT, generator

# The held-out share of a source without a test split of its own, unless --test-fraction says otherwise.
DEFAULT_TEST_FRACTION = 0.1
# The options that decide a run's images and its test split: what eval, export's metadata and reconstruct keep.
DATA_OPTIONS = ("data", "data_dir", "test_fraction", "test_data", "skip_bad", "seed")


@dataclass(frozen=True)
class Splits:
    train: torch.Tensor  # uint8 (N, C, 28, 28)
    test: torch.Tensor  # uint8 (M, C, 28, 28), the same C
    description: str  # for the log


def test_fraction(config: TrainConfig) -> float | None:
    """The held-out fraction the run draws from its source: None where the source has a test split."""
    if config.data in DATASETS or config.test_data is not None:
        return None
    return DEFAULT_TEST_FRACTION if config.test_fraction is None else config.test_fraction


def _dataset_split(config: TrainConfig, split: str, channels: int | None) -> torch.Tensor:
    """One split of a dataset name, with `channels` channels (L -> RGB as for a grayscale folder)."""
    images = load_images(config.data, split, config.data_dir)
    if channels is None or channels == images.shape[1]:
        return images
    from fastvae.images import convert_channels

    return torch.from_numpy(convert_channels(images.numpy(), channels))


def _check_dataset_options(config: TrainConfig) -> None:
    for option, value in (("--test-fraction", config.test_fraction), ("--test-data", config.test_data),
                          ("--skip-bad", config.skip_bad or None)):
        if value is not None:
            raise FastVAEError(f"{option} is for your own images: {config.data} has its own test split")


def load_test_images(config: TrainConfig, channels: int | None = None) -> torch.Tensor:
    """The test images of `config`'s data, as `load_splits(config, channels).test`, reading only the test split
    of a dataset name (a source of your own is split whole)."""
    if config.data in DATASETS:
        _check_dataset_options(config)
        return _dataset_split(config, "test", config.channels if channels is None else channels)
    return load_splits(config, channels, progress=False).test


def load_splits(config: TrainConfig, channels: int | None = None, progress: bool = True) -> Splits:
    """The train and test images of `config`'s data. `channels` 1 or 3 converts them; None keeps the source's
    (for a dataset name, or when --channels is unset)."""
    channels = config.channels if channels is None else channels
    if config.data in DATASETS:
        _check_dataset_options(config)
        train, test = (_dataset_split(config, split, channels) for split in ("train", "test"))
        return Splits(train, test, f"{config.data}: {len(train):,} training and {len(test):,} test images")

    if not Path(config.data).exists():
        raise FastVAEError(f"--data {config.data}: not a dataset ({' or '.join(DATASETS)}) and no such folder or "
                           "file; give a dataset name, a folder of images or a .npy/.npz array")
    from fastvae.images import load_image_source

    if config.data_dir is not None:
        raise FastVAEError("--data-dir is for the IDX files of a dataset name; with --data PATH, drop it")
    source = load_image_source(config.data, channels, skip_bad=config.skip_bad, progress=progress)
    if config.test_data is not None:
        test = load_image_source(config.test_data, source.images.shape[1], skip_bad=config.skip_bad,
                                 progress=progress)
        return Splits(source.images, test.images, f"train: {source.description}; test: {test.description}")
    fraction = test_fraction(config)
    order = torch.randperm(len(source.images), generator=generator(config.seed, 0, SPLIT))
    held_out = round(len(order) * fraction)
    if held_out < 1 or held_out == len(order):
        raise FastVAEError(f"--test-fraction {fraction:g} of {len(order)} images leaves {held_out} for testing and "
                           f"{len(order) - held_out} for training: give more images or another --test-fraction")
    test_rows, train_rows = order[:held_out].sort().values, order[held_out:].sort().values
    return Splits(source.images[train_rows], source.images[test_rows],
                  f"{source.description}; {len(train_rows):,} for training, {held_out:,} held out for testing "
                  f"(--test-fraction {fraction:g}, drawn by --seed {config.seed})")


def split_config(saved: dict | None, data: str | None, data_dir: str | None) -> TrainConfig:
    """The options to read a run's test split with: the run's own (`saved`, its train_config or the data options
    an export recorded), unless --data names another source; --data-dir overrides where its IDX files lie."""
    if data is not None:
        return TrainConfig(data=data, data_dir=data_dir)
    options = {k: saved[k] for k in DATA_OPTIONS if k in saved} if saved else {}
    if data_dir is not None:
        options["data_dir"] = data_dir
    return TrainConfig(**options)
