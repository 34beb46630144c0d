"""Training on your own images end to end: a colour folder trains a 3-channel model that exports and samples in
colour through the runtime; arrays and --channels; the held-out split is the seed's, and eval and reconstruct
read the run's own split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvae.cli import main
from fastvae.config import TrainConfig
from fastvae.runtime import OnnxVAE
from fastvae.splits import load_splits, load_test_images

COMMON = ["--batch-size", "16", "--epochs", "1", "--z-dim", "4", "--no-progress"]


def _blob_images(n: int, rng: np.random.Generator, colour: bool, size: tuple[int, int]) -> np.ndarray:
    """n uint8 images (n, H, W[, 3]) of bright rectangles on black, in random colours."""
    height, width = size
    images = np.zeros((n, height, width, 3), np.uint8)
    for image in images:
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[top : top + height // 3, left : left + width // 3] = rng.integers(80, 256, size=3)
    return images if colour else images[..., 0]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 colour images of odd sizes, PNG and JPEG, in two folders."""
    folder = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for i, image in enumerate(_blob_images(80, rng, colour=True, size=(37, 45))):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:03d}.{'png' if i % 3 else 'jpg'}")
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded folders are cached in this test's folder, not the user's ~/.cache."""
    monkeypatch.setattr("fastvae.images.MNIST_CACHE_DIR", tmp_path / "cache")


@pytest.mark.slow
def test_a_colour_folder_trains_exports_and_samples_in_colour(colour_folder: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(colour_folder), "--out", str(run), *COMMON]) == 0
    out = capsys.readouterr().out
    assert "data: " in out and "72 for training, 8 held out" in out, out
    record = json.loads((run / "run.json").read_text())
    assert record["model_config"]["im_chan"] == 3 and record["train_config"]["data"] == str(colour_folder)
    assert Image.open(run / "samples.png").mode == "RGB"
    for part in ("decoder", "vae"):
        assert main(["export", str(tmp_path / f"{part}.onnx"), "--checkpoint", str(run), "--part", part]) == 0
    decoder = OnnxVAE(tmp_path / "decoder.onnx")
    assert decoder.image_shape == (3, 28, 28) and decoder.sample(5, seed=0).shape == (5, 3, 28, 28)
    assert main(["sample", str(tmp_path / "decoder.onnx"), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").mode == "RGB"
    # reconstruct and eval read the run's own held-out images, recorded in the run and in the export
    assert main(["reconstruct", str(tmp_path / "vae.onnx"), "--n", "8", "--out", str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").size == (8 * 30 + 2, 2 * 30 + 2)
    assert main(["eval", str(run), "--k", "2"]) == 0
    assert "on 8 " in capsys.readouterr().out


def test_the_split_is_the_seeds(colour_folder: Path) -> None:
    config = TrainConfig(data=str(colour_folder), seed=3)
    first, again = load_splits(config, progress=False), load_splits(config, progress=False)
    other = load_splits(TrainConfig(data=str(colour_folder), seed=4), progress=False)
    assert first.train.equal(again.train) and first.test.equal(again.test)
    assert not first.test.equal(other.test)
    assert len(first.test) == 8 and len(first.train) == 72
    together = {bytes(image.numpy()) for image in (*first.train, *first.test)}
    assert len(together) == 80, "train and test overlap or lose images"
    fifth = load_splits(TrainConfig(data=str(colour_folder), test_fraction=0.25), progress=False)
    assert len(fifth.test) == 20


@pytest.mark.slow
def test_arrays_channels_and_a_test_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.save(tmp_path / "train.npy", _blob_images(64, rng, colour=False, size=(28, 28)))
    np.savez(tmp_path / "test.npz", images=_blob_images(16, rng, colour=False, size=(28, 28)))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "train.npy"), "--test-data", str(tmp_path / "test.npz"),
                 "--channels", "3", "--out", str(run), *COMMON]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["model_config"]["im_chan"] == 3
    splits = load_splits(TrainConfig(data=str(tmp_path / "train.npy"), test_data=str(tmp_path / "test.npz")),
                         progress=False)
    assert splits.train.shape == (64, 1, 28, 28) and splits.test.shape == (16, 1, 28, 28)


@pytest.mark.slow
def test_resume_keeps_the_channels(colour_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(colour_folder), "--out", str(run), *COMMON]) == 0
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--channels", "1", "--no-progress"]) == 2
    assert "--channels 1 disagrees with the checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0


def test_a_dataset_converted_to_three_channels(tiny_data_dir: Path) -> None:
    gray = load_splits(TrainConfig(data_dir=str(tiny_data_dir)), progress=False)
    colour = load_splits(TrainConfig(data_dir=str(tiny_data_dir), channels=3), progress=False)
    assert colour.train.shape == (len(gray.train), 3, 28, 28)
    assert colour.test.equal(gray.test.expand(-1, 3, -1, -1))


def test_the_test_images_alone_are_the_splits_test_images(colour_folder: Path, tiny_data_dir: Path) -> None:
    for config in (TrainConfig(data_dir=str(tiny_data_dir), channels=3), TrainConfig(data=str(colour_folder))):
        assert load_test_images(config).equal(load_splits(config, progress=False).test)
