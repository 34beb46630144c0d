"""fastvae.runtime: the exported graphs run with numpy alone (no torch), match PyTorch, and reject bad files, bad
inputs and NaN outputs with a ValueError naming what was expected; `fastvae sample` and `reconstruct` write the
right PNGs (and .npy arrays of any size), creating missing folders and refusing bad --out paths before any work."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from fastvae import bulk, runtime
from fastvae.checkpoint import save_checkpoint
from fastvae.cli import main
from fastvae.config import ModelConfig, TrainConfig
from fastvae.errors import FastVAEError
from fastvae.export.exporter import export_onnx
from fastvae.files import check_output_file, image_grid
from fastvae.model import VAE
from fastvae.plan import cpu_plan
from fastvae.run_folder import new_record
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
    save_checkpoint(folder / "run", model, CONFIG, new_record(CONFIG, TrainConfig(), cpu_plan(), epochs_done=1), {})
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
    half = z.astype(np.float16)
    np.testing.assert_array_equal(vae.decode(half), vae.decode(half.astype(np.float32)))
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
    for dtype in (np.float64, np.float16):  # cast to float32, as documented
        other = images.astype(dtype)
        np.testing.assert_array_equal(vae.encode(other)[0], vae.encode(other.astype(np.float32))[0])
        np.testing.assert_array_equal(vae.reconstruct(other, seed=1), vae.reconstruct(other.astype(np.float32), seed=1))


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
    ("decoder", lambda v: v.decode(np.zeros((2, 5), bool)), "must be a float array"),
    ("decoder", lambda v: v.decode(np.zeros((2, 5), np.complex64)), "must be a float array"),
    ("decoder", lambda v: v.decode([[0.0] * 5]), "must be a numpy array"),
    ("decoder", lambda v: v.decode(np.full((2, 5), np.nan, np.float32)), "NaN"),
    ("decoder", lambda v: v.sample(0), "positive integer"),
    ("decoder", lambda v: v.encode(_images(2)), "needs a file exported with --part encoder or --part vae"),
    ("decoder", lambda v: v.reconstruct(_images(2)), "--part vae.*holds the 'decoder' part"),
    ("vae", lambda v: v.decode(np.zeros((2, 5), np.float32)), "--part decoder.*holds the 'vae' part"),
    ("vae", lambda v: v.reconstruct((_images(2) * 255).astype(np.uint8)), "divide by 255"),
    ("vae", lambda v: v.reconstruct(_images(2) * 255), r"must lie in \[0, 1\]"),
    ("vae", lambda v: v.encode(np.zeros((2, 1, 32, 32), np.float32)), r"shape \(B, 1, 28, 28\)"),
], ids=["z_dim", "empty", "ndim", "int", "bool", "complex", "list", "nan", "n", "encode-decoder",
        "reconstruct-decoder", "decode-vae", "uint8", "range", "image-size"])
def test_bad_inputs(files: dict[str, Path], part: str, call, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        call(OnnxVAE(files[part], device="cpu"))


def _strip_metadata(path: Path, out: Path) -> None:
    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, out)


def _set_metadata(key: str, value: str):
    def make(path: Path, out: Path) -> None:
        proto = onnx.load(path)
        next(p for p in proto.metadata_props if p.key == key).value = value
        onnx.save(proto, out)
    return make


def _replace_bytes(old: bytes, new: bytes):
    """Replace the serialized bytes `old` (which must be there) by `new`: damage no onnx API would write."""
    def make(path: Path, out: Path) -> None:
        data = path.read_bytes()
        assert old in data
        out.write_bytes(data.replace(old, new))
    return make


@pytest.mark.parametrize("make, expected", [
    (lambda src, out: out.write_text("not a model"), "not a loadable ONNX model"),
    (lambda src, out: out.write_bytes(src.read_bytes()[: src.stat().st_size // 2]), "not a loadable ONNX model"),
    (lambda src, out: out.write_bytes(b""), "not a fastvae export|not a loadable"),
    (_strip_metadata, "not a fastvae export"),
    (lambda src, out: None, "no ONNX model at"),
    (_set_metadata("fastvae.z_dim", "6"), r"the graph's z is tensor\(float\) \['batch', 5\] but its metadata says"),
    (_set_metadata("fastvae.image_shape", "[1, 28]"), "not a fastvae export.*not sizes"),
    # A name that is not UTF-8: onnxruntime's Python side raises UnicodeDecodeError, in its session or later.
    (_replace_bytes(b"\x12\x05batch", b"\x12\x05b\xffTch"), "not a fastvae export.*utf-8"),
    (_replace_bytes(b"\n\x06images\x12", b"\n\x06im\xffges\x12"), "not a loadable ONNX model.*utf-8"),
], ids=["text", "truncated", "empty", "no-metadata", "missing", "z-dim-disagrees", "image-shape",
        "dim-name-not-utf8", "output-name-not-utf8"])
def test_bad_files(files: dict[str, Path], tmp_path: Path, make, expected: str,
                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.onnx"
    make(files["decoder"], out)
    with pytest.raises(ValueError, match=expected) as error:
        OnnxVAE(out, device="cpu")
    assert "\n" not in str(error.value)
    assert capsys.readouterr().out == ""  # no "EP Error" banner from onnxruntime's fallback


def _poison(path: Path, out: Path) -> None:
    """A copy of the export `path` whose largest float initializer (a weight matrix) is all NaN."""
    proto = onnx.load(path)
    weight = max((t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
                 key=lambda t: np.prod(t.dims))
    weight.CopyFrom(onnx.numpy_helper.from_array(np.full(tuple(weight.dims), np.nan, np.float32), weight.name))
    onnx.save(proto, out)


@pytest.fixture(scope="module")
def poisoned(files: dict[str, Path]) -> dict[str, Path]:
    """The decoder and vae exports with NaN weights, as an export from a NaN checkpoint would hold them (export
    itself refuses such checkpoints)."""
    paths = {part: path.with_name(f"{part}-nan.onnx") for part, path in files.items()}
    for part, path in paths.items():
        _poison(files[part], path)
    return paths


@pytest.mark.parametrize("part, call", [
    ("decoder", lambda v: v.decode(np.zeros((3, 5), np.float32))),
    ("decoder", lambda v: v.sample(200, seed=0)),  # split into pieces on a multi-core machine
    ("vae", lambda v: v.encode(_images(3))),
    ("vae", lambda v: v.reconstruct(_images(3), seed=0)),
], ids=["decode", "sample", "encode", "reconstruct"])
def test_non_finite_output_raises(poisoned: dict[str, Path], part: str, call) -> None:
    with pytest.raises(ValueError) as error:
        call(OnnxVAE(poisoned[part], device="cpu"))
    assert str(error.value) == (f"{poisoned[part]} produced NaN or infinite values: the model's weights are broken; "
                                "export it again from a good checkpoint")


def test_graph_that_cannot_run_raises_value_error(files: dict[str, Path], tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """A damaged index (the matmul decoder's pixel order) loads, then fails in onnxruntime with a RuntimeError
    that the runtime turns into a one-line ValueError, with nothing of onnxruntime's own logged on stderr."""
    proto = onnx.load(files["decoder"])
    index = max((t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT64),
                key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(index).copy()
    values.flat[0] = 10**12
    index.CopyFrom(onnx.numpy_helper.from_array(values, index.name))
    onnx.save(proto, tmp_path / "model.onnx")
    vae = OnnxVAE(tmp_path / "model.onnx", device="cpu")
    capfd.readouterr()
    with pytest.raises(ValueError, match="could not be run by onnxruntime") as error:
        vae.decode(np.zeros((2, 5), np.float32))
    assert "\n" not in str(error.value)
    assert capfd.readouterr().err == ""


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


def _one_line_error(capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_check_output_file(tmp_path: Path) -> None:
    out = tmp_path / "new" / "folders" / "grid.png"
    assert check_output_file(str(out), "--out") == out
    assert _listing(tmp_path) == ["new", "new/folders"]  # the folders it made, nothing else
    (tmp_path / "blocker").write_text("keep me")
    for path, expected in [
        (tmp_path, f"cannot write {tmp_path} (--out): it is a directory; give a file name, not a folder"),
        (tmp_path / "blocker" / "grid.png",
         f"cannot write {tmp_path}/blocker/grid.png (--out): {tmp_path}/blocker is a file, not a folder"),
        (tmp_path / "blocker" / "a" / "grid.png", f"{tmp_path}/blocker is a file, not a folder"),
    ]:
        with pytest.raises(FastVAEError) as error:
            check_output_file(path, "--out")
        assert expected in str(error.value) and "\n" not in str(error.value)
    assert (tmp_path / "blocker").read_text() == "keep me"
    assert _listing(tmp_path) == ["blocker", "new", "new/folders"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write read-only files and folders")
def test_check_output_file_read_only(tmp_path: Path) -> None:
    (tmp_path / "locked").mkdir(mode=0o555)
    (tmp_path / "grid.png").write_bytes(b"old")
    (tmp_path / "grid.png").chmod(0o444)
    for path, expected in [(tmp_path / "locked" / "grid.png", "the folder .* is not writable"),
                           (tmp_path / "locked" / "new" / "grid.png", "cannot create the folder"),
                           (tmp_path / "grid.png", "the file exists and is read-only")]:
        with pytest.raises(FastVAEError, match=expected):
            check_output_file(path, "--out")


@pytest.mark.parametrize("command, argv, expected", [
    ("sample", ["--n", "4097", "--out", "{d}/grid.png"], "--n 4097 is more than a PNG grid holds (4096 images); "
     "write them as one array instead: --out {d}/grid.npy"),
    ("sample", ["--out", "{d}/grid.jpg"], "--out must end in .png or .npy, got {d}/grid.jpg"),
    ("sample", ["--out", "{d}/folder.png"], "cannot write {d}/folder.png (--out): it is a directory"),
    ("sample", ["--out", "{d}/blocker/grid.npy"], "{d}/blocker is a file, not a folder"),
    ("reconstruct", ["--n", "2049", "--out", "{d}/recon.png"], "--n 2049 is too many: originals and "
     "reconstructions make 4098 images, more than a PNG grid holds (4096); use --n 2048 or fewer"),
    ("reconstruct", ["--out", "{d}"], "cannot write {d} (--out): it is a directory"),
], ids=["grid-too-large", "suffix", "directory", "file-in-the-way", "recon-too-large", "recon-directory"])
def test_cli_refuses_output_before_loading(command: str, argv: list[str], expected: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "blocker").write_text("keep me")
    (tmp_path / "folder.png").mkdir()
    model = tmp_path / "never-loaded.onnx"  # missing: an error about it would mean the output was checked late
    assert main([command, str(model), *[a.format(d=tmp_path) for a in argv]]) == 2
    _one_line_error(capsys, expected.format(d=tmp_path))
    assert _listing(tmp_path) == ["blocker", "folder.png"]


def test_cli_creates_missing_folders(files: dict[str, Path], tiny_data_dir: Path, tmp_path: Path) -> None:
    assert main(["sample", str(files["decoder"]), "--n", "4", "--out", str(tmp_path / "a" / "s.png")]) == 0
    assert main(["reconstruct", str(files["vae"]), "--data-dir", str(tiny_data_dir), "--n", "2",
                 "--out", str(tmp_path / "b" / "c" / "r.png")]) == 0
    assert _listing(tmp_path) == ["a", "a/s.png", "b", "b/c", "b/c/r.png"]


@pytest.mark.parametrize("n, size, expected", [
    (5000, 1200, [1000] * 5), (4097, 4096, [2049, 2048]), (8192, 4096, [4096, 4096]), (1, 4096, [1]), (3, 1, [1] * 3),
])
def test_chunks_are_near_equal(n: int, size: int, expected: list[int]) -> None:
    pieces = bulk.chunks(n, size)
    assert [stop - start for start, stop in pieces] == expected
    assert [start for start, _ in pieces] == [0] + [stop for _, stop in pieces[:-1]] and pieces[-1][1] == n


def test_cli_sample_npy_in_chunks(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5000 samples (more than a grid holds) decoded 500 at a time into the file, equal to one sample() call."""
    monkeypatch.setattr(bulk, "SAMPLE_CHUNK", 500)
    batches: list[int] = []
    decode = OnnxVAE.decode
    monkeypatch.setattr(OnnxVAE, "decode", lambda self, z: batches.append(len(z)) or decode(self, z))
    out = tmp_path / "samples.npy"
    tracemalloc.start()
    try:
        assert main(["sample", str(files["decoder"]), "--n", "5000", "--out", str(out), "--seed", "2",
                     "--device", "cpu"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert batches == [500] * 10
    samples = np.load(out)
    assert samples.dtype == np.float32 and samples.shape == (5000, 1, 28, 28)
    np.testing.assert_array_equal(samples, OnnxVAE(files["decoder"], device="cpu").sample(5000, seed=2))
    # NOTE: measured 2.8 MB of numpy and Python allocations at its peak, against the array's 15.7 MB.
    assert peak < samples.nbytes / 3, f"peak {peak / 1e6:.1f} MB: the array was held whole"
    assert _listing(tmp_path) == ["samples.npy"]


@pytest.mark.parametrize("failure, code", [(KeyboardInterrupt, 130), (ValueError("decoder broke"), 2)],
                         ids=["interrupt", "error"])
def test_cli_sample_npy_failure_keeps_old_file(failure: BaseException, code: int, files: dict[str, Path],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "samples.npy"
    np.save(out, np.zeros(3))
    before = out.read_bytes()
    monkeypatch.setattr(bulk, "SAMPLE_CHUNK", 100)
    decode, calls = OnnxVAE.decode, []

    def fail_on_third(self: OnnxVAE, z: np.ndarray) -> np.ndarray:
        calls.append(len(z))
        if len(calls) == 3:
            raise failure
        return decode(self, z)

    monkeypatch.setattr(OnnxVAE, "decode", fail_on_third)
    assert main(["sample", str(files["decoder"]), "--n", "500", "--out", str(out)]) == code
    assert out.read_bytes() == before
    assert _listing(tmp_path) == ["samples.npy"]  # no temp file left


def test_cli_sample_npy_needs_disk_space(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bulk.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    assert main(["sample", str(files["decoder"]), "--n", "1000", "--out", str(tmp_path / "s.npy")]) == 2
    _one_line_error(capsys, "1000 samples need 0.00314 GB as float32 but", "has 0.001 GB free; ask for fewer with --n")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("suffix", [".png", ".npy"])
def test_cli_sample_non_finite_model(suffix: str, poisoned: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"samples{suffix}"
    out.write_bytes(b"a good earlier file")
    with np.errstate(all="raise"):  # and no numpy warning on the way
        assert main(["sample", str(poisoned["decoder"]), "--n", "16", "--out", str(out)]) == 2
    _one_line_error(capsys, f"{poisoned['decoder']} produced NaN or infinite values")
    assert out.read_bytes() == b"a good earlier file"
    assert _listing(tmp_path) == [out.name]


def test_cli_reconstruct_non_finite_model(poisoned: dict[str, Path], tiny_data_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "recon.png"
    argv = ["reconstruct", str(poisoned["vae"]), "--data-dir", str(tiny_data_dir), "--n", "4", "--out", str(out)]
    assert main(argv) == 2
    _one_line_error(capsys, f"{poisoned['vae']} produced NaN or infinite values")
    assert not out.exists()
