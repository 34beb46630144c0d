"""fastvae.runtime: the exported graphs run with numpy alone (no torch), match PyTorch, and reject bad files and
bad inputs with a ValueError naming what was expected; `fastvae sample` and `reconstruct` write the right PNGs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from fastvae import runtime
from fastvae.checkpoint import save_checkpoint
from fastvae.cli import main
from fastvae.config import ModelConfig
from fastvae.export.onnx import export_onnx
from fastvae.files import image_grid
from fastvae.model import VAE
from fastvae.runtime import MAX_PIECE, MIN_PIECE, OnnxVAE, batch_pieces

CONFIG = ModelConfig(z_dim=5)
ATOL = 1e-4  # fp32 graph vs eager PyTorch, as `fastvae export` verifies


@pytest.fixture(scope="module")
def model() -> VAE:
    return VAE(CONFIG).eval()


@pytest.fixture(scope="module")
def files(model: VAE, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Decoder and vae exports of `model` (verification is test_export's job, so it is skipped here)."""
    folder = tmp_path_factory.mktemp("runtime")
    (folder / "run").mkdir()
    save_checkpoint(folder / "run", model, CONFIG, {"epochs_done": 1}, {})
    paths = {part: folder / f"{part}.onnx" for part in ("decoder", "vae")}
    for part, path in paths.items():
        export_onnx(path, folder / "run", part, verify=False, log=lambda _: None)
    return paths


def _images(n: int) -> np.ndarray:
    return np.random.default_rng().random((n, 1, 28, 28), dtype=np.float32)


def test_decode_and_sample_match_pytorch(files: dict[str, Path], model: VAE) -> None:
    vae = OnnxVAE(files["decoder"], device="cpu")
    assert (vae.part, vae.z_dim, vae.image_shape, vae.provider) == ("decoder", 5, (1, 28, 28), "CPUExecutionProvider")
    z = np.random.default_rng().standard_normal((9, 5)).astype(np.float32)
    with torch.no_grad():
        expected = torch.sigmoid(model.decode(torch.from_numpy(z))).numpy()
    np.testing.assert_allclose(vae.decode(z), expected, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(vae.decode(z.astype(np.float64)), vae.decode(z))  # other floats are cast
    samples = vae.sample(4, seed=3)
    z3 = np.random.default_rng(3).standard_normal((4, 5), dtype=np.float32)
    np.testing.assert_array_equal(samples, vae.decode(z3))
    assert not np.array_equal(samples, vae.sample(4, seed=4))


def test_encode_and_reconstruct_match_pytorch(files: dict[str, Path], model: VAE) -> None:
    vae = OnnxVAE(files["vae"], device="cpu")
    images = _images(6)
    eps = np.random.default_rng(7).standard_normal((6, 5), dtype=np.float32)
    with torch.no_grad():
        logits, mean, log_sigma, _ = model(torch.from_numpy(images), torch.from_numpy(eps))
    np.testing.assert_allclose(vae.reconstruct(images, seed=7), torch.sigmoid(logits).numpy(), rtol=0, atol=ATOL)
    got_mean, got_log_sigma = vae.encode(images)
    np.testing.assert_allclose(got_mean, mean.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(got_log_sigma, log_sigma.numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("batch, workers", [(1, 2), (31, 2), (32, 2), (129, 2), (1000, 2), (1024, 16), (64, 1)])
def test_batch_pieces_cover_the_batch(batch: int, workers: int) -> None:
    pieces = batch_pieces(batch, workers)
    assert [start for start, _ in pieces] == [0] + [stop for _, stop in pieces[:-1]]
    assert pieces[-1][1] == batch
    if workers < 2 or batch < MIN_PIECE * workers:
        assert pieces == [(0, batch)]
    else:
        sizes = [stop - start for start, stop in pieces]
        assert len(pieces) >= workers and max(sizes) <= MAX_PIECE and min(sizes[:-1]) >= MIN_PIECE


@pytest.mark.parametrize("part", ["decoder", "vae"])
def test_split_batches_give_the_whole_batch_result(files: dict[str, Path], part: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces run on a thread pool into slices of the output buffers: the result is the whole run's."""
    monkeypatch.setattr(runtime, "physical_cores", lambda: 2)  # split even on a one-core machine
    split, whole = OnnxVAE(files[part], device="cpu"), OnnxVAE(files[part], device="cpu", split_batches=False)
    batch = 2 * MAX_PIECE + 5
    assert len(batch_pieces(batch, 2)) == 4
    if part == "decoder":
        z = np.random.default_rng(0).standard_normal((batch, 5)).astype(np.float32)
        pairs = [(split.decode(z), whole.decode(z))]
    else:
        images = _images(batch)
        pairs = [(split.reconstruct(images, seed=1), whole.reconstruct(images, seed=1)),
                 *zip(split.encode(images), whole.encode(images), strict=True)]
    for got, expected in pairs:
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("part, call, expected", [
    ("decoder", lambda v: v.decode(np.zeros((2, 6), np.float32)), r"z must have shape \(B, 5\)"),
    ("decoder", lambda v: v.decode(np.zeros((0, 5), np.float32)), "B >= 1"),
    ("decoder", lambda v: v.decode(np.zeros(5, np.float32)), r"shape \(B, 5\)"),
    ("decoder", lambda v: v.decode(np.zeros((2, 5), np.int64)), "must be a float array"),
    ("decoder", lambda v: v.decode([[0.0] * 5]), "must be a numpy array"),
    ("decoder", lambda v: v.decode(np.full((2, 5), np.nan, np.float32)), "NaN"),
    ("decoder", lambda v: v.sample(0), "positive integer"),
    ("decoder", lambda v: v.encode(_images(2)), "needs a file exported with --part encoder or --part vae"),
    ("decoder", lambda v: v.reconstruct(_images(2)), "--part vae.*holds the 'decoder' part"),
    ("vae", lambda v: v.decode(np.zeros((2, 5), np.float32)), "--part decoder.*holds the 'vae' part"),
    ("vae", lambda v: v.reconstruct((_images(2) * 255).astype(np.uint8)), "divide by 255"),
    ("vae", lambda v: v.reconstruct(_images(2) * 255), r"must lie in \[0, 1\]"),
    ("vae", lambda v: v.encode(np.zeros((2, 1, 32, 32), np.float32)), r"shape \(B, 1, 28, 28\)"),
], ids=["z_dim", "empty", "ndim", "int", "list", "nan", "n", "encode-decoder", "reconstruct-decoder",
        "decode-vae", "uint8", "range", "image-size"])
def test_bad_inputs(files: dict[str, Path], part: str, call, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        call(OnnxVAE(files[part], device="cpu"))


def _strip_metadata(path: Path, out: Path) -> None:
    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, out)


@pytest.mark.parametrize("make, expected", [
    (lambda src, out: out.write_text("not a model"), "not a loadable ONNX model"),
    (lambda src, out: out.write_bytes(src.read_bytes()[: src.stat().st_size // 2]), "not a loadable ONNX model"),
    (lambda src, out: out.write_bytes(b""), "not a fastvae export|not a loadable"),
    (_strip_metadata, "not a fastvae export"),
    (lambda src, out: None, "no ONNX model at"),
], ids=["text", "truncated", "empty", "no-metadata", "missing"])
def test_bad_files(files: dict[str, Path], tmp_path: Path, make, expected: str) -> None:
    out = tmp_path / "model.onnx"
    make(files["decoder"], out)
    with pytest.raises(ValueError, match=expected):
        OnnxVAE(out, device="cpu")


def test_runtime_needs_no_torch(files: dict[str, Path]) -> None:
    code = (
        "import sys\nfrom fastvae.files import save_png\nfrom fastvae.runtime import OnnxVAE\n"
        f"images = OnnxVAE({str(files['decoder'])!r}).sample(4, seed=0)\n"
        f"save_png({str(files['decoder'].with_suffix('.png'))!r}, images, nrow=2)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nprint(images.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(4, 1, 28, 28)"


def test_image_grid_matches_torchvision() -> None:
    images = _images(10)
    expected = make_grid(torch.from_numpy(images), nrow=4, padding=2, pad_value=1.0)[0]
    np.testing.assert_array_equal(image_grid(images, nrow=4), expected.mul(255).round().byte().numpy())


def test_cli_sample(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid.png"
    assert main(["sample", str(files["decoder"]), "--n", "64", "--out", str(out), "--seed", "0"]) == 0
    assert Image.open(out).size == (8 * 30 + 2, 8 * 30 + 2)  # 8x8 images of 28 px, 2 px padding
    assert main(["sample", str(files["vae"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--part decoder" in err, err


def test_cli_reconstruct(files: dict[str, Path], tiny_data_dir: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "recon.png"
    argv = ["--data-dir", str(tiny_data_dir), "--n", "5", "--out", str(out), "--seed", "1"]
    assert main(["reconstruct", str(files["vae"]), *argv]) == 0
    assert Image.open(out).size == (5 * 30 + 2, 2 * 30 + 2)  # originals above reconstructions
    assert main(["reconstruct", str(files["decoder"]), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--part vae" in err, err
