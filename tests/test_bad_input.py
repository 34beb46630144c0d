"""The bad-input matrix: every command x every class of bad input exits 2 with exactly one line on stderr, no
traceback, and every file that existed before byte-identical afterwards (nothing created either)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastvae.checkpoint import FORMAT, save_checkpoint
from fastvae.cli import main
from fastvae.config import ModelConfig, TrainConfig
from fastvae.data import write_idx
from fastvae.export.exporter import export_onnx
from fastvae.model import VAE
from fastvae.plan import cpu_plan
from fastvae.run_folder import RECORD, WEIGHTS, new_record
from tests.helpers import folder_snapshot

Z_DIM = 4


@dataclass(frozen=True)
class World:
    """Good inputs every case starts from, in one folder that no case may change."""

    root: Path
    data: Path  # tiny IDX data
    run: Path  # a trained run folder
    decoder: Path  # exports of `run`
    vae: Path
    encoder: Path


@pytest.fixture(scope="module")
def world(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_data_dir, root / "data")
    run = root / "run"
    assert main(["train", "--data-dir", str(root / "data"), "--batch-size", "32", "--limit-train", "64", "--epochs",
                 "1", "--z-dim", str(Z_DIM), "--out", str(run), "--no-progress"]) == 0
    parts = {part: root / f"{part}.onnx" for part in ("decoder", "vae", "encoder")}
    for part, path in parts.items():
        export_onnx(path, run, part, verify=False, log=lambda _: None)
    return World(root, root / "data", run, parts["decoder"], parts["vae"], parts["encoder"])


@pytest.fixture(autouse=True)
def private_image_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded folders are cached outside both the world and the case folder (and the user's ~/.cache)."""
    monkeypatch.setattr("fastvae.images.MNIST_CACHE_DIR", tmp_path_factory.mktemp("image-cache"))


def _copy_run(world: World, case: Path) -> Path:
    shutil.copytree(world.run, case / "run")
    return case / "run"


def _run_with_record(world: World, case: Path, text: str) -> Path:
    """A copy of the run whose run.json holds `text`."""
    run = _copy_run(world, case)
    (run / RECORD).write_text(text)
    return run


def _run_json(text: str) -> Callable[[World, Path], list[str]]:
    """Resume a copy of the run whose run.json holds `text`."""
    def setup(world: World, case: Path) -> list[str]:
        run = _run_with_record(world, case, text)
        return ["train", "--resume", "--epochs", "2", "--out", str(run), "--data-dir", str(world.data)]
    return setup


def _record_with(**changes: object) -> str:
    record = {**new_record(ModelConfig(z_dim=Z_DIM), TrainConfig(batch_size=32), cpu_plan(), epochs_done=1), **changes}
    return json.dumps(record)


def _idx_dir(images: np.ndarray) -> Callable[[Path], Path]:
    def make(case: Path) -> Path:
        folder = case / "idx"
        folder.mkdir()
        write_idx(folder / "train-images-idx3-ubyte", images)
        write_idx(folder / "t10k-images-idx3-ubyte", images)
        return folder
    return make


_WRONG_SIZE = _idx_dir(np.zeros((64, 32, 32), np.uint8))


def _garbage_dir(case: Path) -> Path:
    folder = case / "garbage"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte").write_bytes(b"garbage" * 10)
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"garbage" * 10)
    return folder


def _file(case: Path, name: str = "a-file", content: bytes = b"keep me") -> Path:
    (case / name).write_bytes(content)
    return case / name


def _folder(case: Path, name: str) -> Path:
    (case / name).mkdir()
    return case / name


def _poisoned_run(world: World, case: Path) -> Path:
    """A run folder whose decoder bias holds a NaN."""
    model = VAE(ModelConfig(z_dim=Z_DIM))
    with torch.no_grad():
        model.decode.gen[3][0].bias[0] = float("nan")
    folder = case / "nan-run"
    folder.mkdir()
    save_checkpoint(folder, model, model.config, new_record(model.config, TrainConfig(), cpu_plan(), epochs_done=1), {})
    return folder


def _misfit_weights(world: World, case: Path) -> Path:
    """A fastvae weights file whose metadata says z_dim 4 but whose tensors are a z_dim-8 model's."""
    folder = case / "misfit"
    folder.mkdir()
    metadata = {"format": FORMAT, "model_config": json.dumps({"z_dim": Z_DIM}), "epoch": "1"}
    save_file(VAE(ModelConfig(z_dim=8)).state_dict(), str(folder / WEIGHTS), metadata=metadata)
    return folder / WEIGHTS


def _image_folder(case: Path, good: int = 0, bad: int = 0, name: str = "photos") -> Path:
    """A folder of `good` 28x28 PNGs and `bad` truncated ones."""
    from PIL import Image

    folder = case / name
    folder.mkdir()
    for i in range(good):
        Image.fromarray(np.full((28, 28), 40 + i % 200, np.uint8)).save(folder / f"good-{i:03d}.png")
    for i in range(bad):
        Image.fromarray(np.full((28, 28), 9, np.uint8)).save(folder / f"bad-{i:03d}.png")
        data = (folder / f"bad-{i:03d}.png").read_bytes()
        (folder / f"bad-{i:03d}.png").write_bytes(data[: len(data) // 2])
    return folder


def _array(case: Path, array: np.ndarray, name: str = "images.npy") -> Path:
    np.save(case / name, array)
    return case / name


def _own(world: World, case: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--batch-size", "32", "--out", str(case / "new"), "--no-progress", *extra]


def _gray_run(world: World, case: Path) -> Path:
    """A 1-epoch run on a small grayscale folder (1 channel)."""
    run = case / "gray-run"
    assert main(_own(world, case, _image_folder(case, good=40), "--out", str(run), "--epochs", "1",
                     "--z-dim", str(Z_DIM))) == 0
    return run


def _truncated(path: Path, case: Path) -> Path:
    return _file(case, path.name, path.read_bytes()[: path.stat().st_size // 3])


def _train(world: World, case: Path, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(world.data), "--batch-size", "32", "--out", str(case / "new"), *extra]


Setup = Callable[[World, Path], list[str]]
# (command, class of bad input, argv builder, text the error line must contain)
CASES: list[tuple[str, str, Setup, str]] = [
    # train
    ("train", "missing", lambda w, c: _train(w, c, "--data-dir", str(c / "nothing")), "is not a folder"),
    ("train", "missing", lambda w, c: _train(w, c, "--data-dir", str(c)), "not found"),
    ("train", "missing", lambda w, c: ["train", "--resume", "--out", str(c / "nothing")], "nothing to resume"),
    ("train", "unreadable", lambda w, c: _train(w, c, "--data-dir", str(_file(c))), "is not a folder"),
    ("train", "corrupt", lambda w, c: _train(w, c, "--data-dir", str(_garbage_dir(c))), "not an IDX file"),
    ("train", "corrupt", _run_json("{ not json"), "invalid JSON"),
    ("train", "wrong type", lambda w, c: _train(w, c, "--epochs", "two"), "invalid int value"),
    ("train", "wrong type", lambda w, c: _train(w, c, "--data", "cifar"), "not a dataset"),
    ("train", "wrong type", _run_json("[]"), "should be an object"),
    ("train", "wrong shape", _run_json("{}"), "model_config: Field required"),
    ("train", "wrong shape", _run_json(_record_with(epochs_done="1")), "epochs_done"),
    ("train", "wrong shape", _run_json(_record_with(train_config={"batch_size": [32]})), "train_config.batch_size"),
    ("train", "wrong shape", lambda w, c: _train(w, c, "--data-dir", str(_WRONG_SIZE(c))), "the model expects"),
    ("train", "missing", lambda w, c: _own(w, c, _folder(c, "empty")), "no .png, .jpg"),
    ("train", "unreadable", lambda w, c: _own(w, c, _image_folder(c, bad=3), "--skip-bad"), "no readable image"),
    ("train", "corrupt", lambda w, c: _own(w, c, _image_folder(c, good=40, bad=1)), "--skip-bad"),
    ("train", "wrong shape", lambda w, c: _own(w, c, _array(c, np.zeros((40, 28), np.uint8))), "is not images"),
    ("train", "wrong type", lambda w, c: _own(w, c, _array(c, np.zeros((40, 28, 28), np.int64))),
     "dtype int64 is not supported"),
    ("train", "out of range", lambda w, c: _own(w, c, _array(c, np.full((40, 28, 28), 2.0))), "outside [0, 1]"),
    ("train", "corrupt", lambda w, c: _own(w, c, _array(c, np.full((40, 28, 28), np.nan))), "NaN"),
    ("train", "out of range", lambda w, c: _own(w, c, _image_folder(c, good=20)), "larger than the training set"),
    ("train", "out of range", lambda w, c: _own(w, c, _image_folder(c, good=40), "--test-fraction", "1.5"),
     "--test-fraction must lie strictly between 0 and 1"),
    ("train", "conflicting", lambda w, c: ["train", "--resume", "--out", str(_gray_run(w, c)), "--epochs", "2",
                                           "--channels", "3"], "--channels 3 disagrees"),
    ("train", "out of range", lambda w, c: _train(w, c, "--epochs", "0"), "--epochs must be at least 1"),
    ("train", "out of range", lambda w, c: _train(w, c, "--batch-size", "0"), "--batch-size must be at least 1"),
    ("train", "out of range", lambda w, c: _train(w, c, "--batch-size", "100000"), "larger than the training set"),
    ("train", "out of range", lambda w, c: _train(w, c, "--lr", "-1"), "--lr must be positive"),
    ("train", "out of range", lambda w, c: _train(w, c, "--z-dim", "0"), "z_dim must be at least 1"),
    ("train", "conflicting", lambda w, c: ["train", "--resume", "--epochs", "2", "--z-dim", "16", "--out",
                                           str(_copy_run(w, c))], "--z-dim 16 disagrees"),
    ("train", "conflicting", lambda w, c: ["train", "--resume", "--epochs", "2", "--seed", "9", "--out",
                                           str(_copy_run(w, c))], "--seed 9 disagrees"),
    ("train", "conflicting", lambda w, c: ["train", "--out", str(_copy_run(w, c))], "already holds a run"),
    ("train", "unwritable output", lambda w, c: _train(w, c, "--out", str(_file(c) / "run")),
     "cannot write to output folder"),
    ("train", "output is a file", lambda w, c: _train(w, c, "--out", str(_file(c))), "cannot write to output folder"),
    # eval
    ("eval", "missing", lambda w, c: ["eval", str(c / "nothing")], "no checkpoint"),
    ("eval", "missing", lambda w, c: ["eval", str(w.run), "--data-dir", str(c / "nothing")], "is not a folder"),
    ("eval", "unreadable", lambda w, c: ["eval", str(c)], "no checkpoint"),
    ("eval", "corrupt", lambda w, c: ["eval", str(_truncated(w.run / "epoch-1" / WEIGHTS, c))], "corrupt"),
    ("eval", "corrupt", lambda w, c: ["eval", str(_run_with_record(w, c, "{"))], "invalid JSON"),
    ("eval", "wrong type", lambda w, c: ["eval", str(w.decoder)], "not a safetensors file"),
    ("eval", "wrong shape", lambda w, c: ["eval", str(w.run), "--data-dir", str(_WRONG_SIZE(c))], "expects"),
    ("eval", "out of range", lambda w, c: ["eval", str(w.run), "--k", "0"], "must be at least 1"),
    ("eval", "out of range", lambda w, c: ["eval", str(w.run), "--limit", "-3"], "must be at least 1"),
    # export
    ("export", "missing", lambda w, c: ["export", str(c / "m.onnx"), "--checkpoint", str(c / "nothing")],
     "no checkpoint"),
    ("export", "corrupt", lambda w, c: ["export", str(c / "m.onnx"), "--checkpoint",
                                        str(_truncated(w.run / "epoch-1" / WEIGHTS, c))], "corrupt"),
    ("export", "corrupt", lambda w, c: ["export", str(c / "m.onnx"), "--checkpoint", str(_poisoned_run(w, c))],
     "NaN"),
    ("export", "unreadable", lambda w, c: ["export", str(c / "m.onnx"), "--checkpoint", str(_folder(c, "empty"))],
     "no checkpoint"),
    ("export", "wrong shape", lambda w, c: ["export", str(c / "m.onnx"), "--checkpoint", str(_misfit_weights(w, c))],
     "does not fit this model"),
    ("export", "wrong type", lambda w, c: ["export", str(c / "m.onnx"), "--checkpoint", str(w.decoder)],
     "not a safetensors file"),
    ("export", "wrong type", lambda w, c: ["export", str(c / "m.onnx"), "--checkpoint", str(w.run), "--part", "x"],
     "invalid choice"),
    ("export", "out of range", lambda w, c: ["export", str(c / "m.onnx"), "--checkpoint", str(w.run), "--opset",
                                             "12"], "--opset 12 is not supported"),
    ("export", "unwritable output", lambda w, c: ["export", str(_file(c) / "m.onnx"), "--checkpoint", str(w.run)],
     "cannot write"),
    ("export", "output is a directory", lambda w, c: ["export", str(c), "--checkpoint", str(w.run)], "directory"),
    # sample
    ("sample", "missing", lambda w, c: ["sample", str(c / "nothing.onnx"), "--out", str(c / "s.png")],
     "no ONNX model"),
    ("sample", "unreadable", lambda w, c: ["sample", str(_folder(c, "m.onnx")), "--out", str(c / "s.png")],
     "no ONNX model"),
    ("sample", "corrupt", lambda w, c: ["sample", str(_truncated(w.decoder, c)), "--out", str(c / "s.png")],
     "not a loadable ONNX model"),
    ("sample", "wrong type", lambda w, c: ["sample", str(w.encoder), "--out", str(c / "s.png")], "--part decoder"),
    ("sample", "wrong type", lambda w, c: ["sample", str(w.decoder), "--n", "many"], "invalid"),
    ("sample", "out of range", lambda w, c: ["sample", str(w.decoder), "--n", "0", "--out", str(c / "s.png")],
     "must be at least 1"),
    ("sample", "out of range", lambda w, c: ["sample", str(w.decoder), "--n", "5000", "--out", str(c / "s.png")],
     ".npy"),
    ("sample", "unwritable output", lambda w, c: ["sample", str(w.decoder), "--out", str(_file(c) / "s.png")],
     "cannot write"),
    ("sample", "output is a directory", lambda w, c: ["sample", str(w.decoder), "--out", str(_folder(c, "s.png"))],
     "directory"),
    ("sample", "wrong type", lambda w, c: ["sample", str(w.decoder), "--out", str(c)], "must end in .png or .npy"),
    # reconstruct
    ("reconstruct", "missing", lambda w, c: ["reconstruct", str(c / "nothing.onnx"), "--data-dir", str(w.data),
                                             "--out", str(c / "r.png")], "no ONNX model"),
    ("reconstruct", "missing", lambda w, c: ["reconstruct", str(w.vae), "--data-dir", str(c / "nothing"),
                                             "--out", str(c / "r.png")], "is not a folder"),
    ("reconstruct", "unreadable", lambda w, c: ["reconstruct", str(_folder(c, "m.onnx")), "--data-dir", str(w.data),
                                                "--out", str(c / "r.png")], "no ONNX model"),
    ("reconstruct", "corrupt", lambda w, c: ["reconstruct", str(_truncated(w.vae, c)), "--data-dir", str(w.data),
                                             "--out", str(c / "r.png")], "not a loadable ONNX model"),
    ("reconstruct", "wrong type", lambda w, c: ["reconstruct", str(w.decoder), "--data-dir", str(w.data),
                                                "--out", str(c / "r.png")], "--part vae"),
    ("reconstruct", "wrong shape", lambda w, c: ["reconstruct", str(w.vae), "--data-dir", str(_WRONG_SIZE(c)),
                                                 "--out", str(c / "r.png")], "shape"),
    ("reconstruct", "out of range", lambda w, c: ["reconstruct", str(w.vae), "--n", "0"], "must be at least 1"),
    ("reconstruct", "unwritable output", lambda w, c: ["reconstruct", str(w.vae), "--data-dir", str(w.data),
                                                       "--out", str(_file(c) / "r.png")], "cannot write"),
    ("reconstruct", "output is a directory", lambda w, c: ["reconstruct", str(w.vae), "--data-dir", str(w.data),
                                                           "--out", str(c)], "directory"),
]


def _case_id(case: tuple[str, str, Setup, str]) -> str:
    return f"{case[0]}-{case[1].replace(' ', '_')}-{case[3][:24]}"


@pytest.mark.parametrize("command, kind, setup, expected", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input(command: str, kind: str, setup: Setup, expected: str, world: World, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = setup(world, tmp_path)
    assert argv[0] == command
    before = folder_snapshot(world.root), folder_snapshot(tmp_path), sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert expected in err, err
    assert (folder_snapshot(world.root), folder_snapshot(tmp_path), sorted(tmp_path.rglob("*"))) == before


# The classes that apply to each command: eval writes no file; train's --out is a folder by design.
_READS = {"missing", "unreadable", "corrupt", "wrong type", "out of range"}
_WRITES = {"unwritable output", "output is a directory"}
APPLICABLE = {
    "train": _READS | {"wrong shape", "conflicting", "unwritable output", "output is a file"},
    "eval": _READS | {"wrong shape"},
    "export": _READS | {"wrong shape"} | _WRITES,
    "sample": _READS | _WRITES,
    "reconstruct": _READS | {"wrong shape"} | _WRITES,
}


def test_every_command_and_class_is_covered() -> None:
    covered = {command: {case[1] for case in CASES if case[0] == command} for command in APPLICABLE}
    assert covered == APPLICABLE
