"""IDX files in and out, clear errors for bad files, and the batching that feeds training."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvae import data
from fastvae.data import load_images, ordered_batches, read_idx, shuffled_batches, write_idx
from fastvae.errors import FastVAEError


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, name: str) -> None:
    array = np.random.default_rng().integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / name, array)
    np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_gzip_is_detected_by_content(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "a.gz", array)
    (tmp_path / "a.gz").rename(tmp_path / "plain-name")
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-name"), array)


def test_bad_magic_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(FastVAEError, match="not an IDX file"):
        read_idx(tmp_path / "x")


def test_unsupported_type_code_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(bytes([0, 0, 0x0D, 1]) + (4).to_bytes(4, "big") + bytes(16))
    with pytest.raises(FastVAEError, match="not supported"):
        read_idx(tmp_path / "x")


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_file_is_rejected(tmp_path: Path, compress: bool) -> None:
    write_idx(tmp_path / "full", np.zeros((10, 28, 28), dtype=np.uint8))
    payload = (tmp_path / "full").read_bytes()[:-100]
    (tmp_path / "cut").write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(FastVAEError, match="truncated"):
        read_idx(tmp_path / "cut")


def test_truncated_gzip_stream_is_rejected(tmp_path: Path) -> None:
    write_idx(tmp_path / "full.gz", np.zeros((10, 28, 28), dtype=np.uint8))
    (tmp_path / "cut.gz").write_bytes((tmp_path / "full.gz").read_bytes()[:-20])
    with pytest.raises(FastVAEError, match="cannot read"):
        read_idx(tmp_path / "cut.gz")


def test_load_images_from_data_dir(tiny_data_dir: Path) -> None:
    train = load_images("fashion-mnist", "train", tiny_data_dir)
    test = load_images("mnist", "test", tiny_data_dir)
    assert train.shape == (256, 1, 28, 28) and train.dtype == torch.uint8
    assert test.shape == (64, 1, 28, 28)


def test_missing_files_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FastVAEError, match="apt-get install -y dataset-fashion-mnist"):
        load_images("fashion-mnist", "train")
    with pytest.raises(FastVAEError, match="--data-dir"):
        load_images("mnist", "train", tmp_path)


def test_unknown_dataset_and_missing_dir() -> None:
    with pytest.raises(FastVAEError, match="unknown dataset 'cifar'"):
        load_images("cifar", "train")
    with pytest.raises(FastVAEError, match="is not a folder"):
        load_images("mnist", "train", "/nonexistent/folder")


def test_shuffled_batches_cover_each_image_at_most_once() -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    batches = list(shuffled_batches(images, 3, torch.Generator().manual_seed(1)))
    assert [len(b) for b in batches] == [3, 3, 3]  # the partial batch is dropped
    seen = torch.cat(batches).flatten().mul(255).round().long()
    assert len(set(seen.tolist())) == 9
    again = list(shuffled_batches(images, 3, torch.Generator().manual_seed(1)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_ordered_batches_keep_the_partial_batch() -> None:
    images = torch.full((10, 1, 2, 2), 255, dtype=torch.uint8)
    batches = list(ordered_batches(images, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(b.dtype == torch.float32 and b.max() == 1.0 for b in batches)


@pytest.mark.skipif(not data.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    test = load_images("fashion-mnist", "test")
    assert test.shape == (10000, 1, 28, 28)


def test_mnist_without_network_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(data, "MNIST_CACHE_DIR", tmp_path)
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(FastVAEError, match="download failed.*--data-dir"):
        load_images("mnist", "train")
