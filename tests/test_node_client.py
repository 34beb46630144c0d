"""examples/node: the Node.js client (onnxruntime-node) decodes and reconstructs exactly as fastvae.runtime does,
writes PNG grids of the right size in grayscale and RGB, and refuses bad files with one line on stderr; its decode
time is printed next to OnnxVAE.decode's (run with -s), not asserted."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from fastvae.checkpoint import save_checkpoint
from fastvae.config import ModelConfig, TrainConfig
from fastvae.export.exporter import export_onnx
from fastvae.files import image_grid
from fastvae.model import VAE
from fastvae.plan import cpu_plan
from fastvae.run_folder import new_record
from fastvae.runtime import OnnxVAE

pytestmark = pytest.mark.slow

CLIENT = Path(__file__).resolve().parents[1] / "examples" / "node"
GRAY, RGB = ModelConfig(), ModelConfig(im_chan=3)  # the default model, so the timings are the default decoder's
ATOL = 1e-5  # the same graph on the same onnxruntime version: only thread scheduling may differ


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the client's packages installed (by `npm ci` here when node_modules is absent)."""
    binary = shutil.which("node")
    if binary is None:
        pytest.skip("needs Node.js (node is not on PATH)")
    if not (CLIENT / "node_modules" / "onnxruntime-node").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("examples/node/node_modules is absent and npm is not on PATH to install it")
        # onnxruntime-node's postinstall would download CUDA binaries from outside the registry: its bundled
        # CPU binaries are all this test needs. NOTE: ~6 s on the 2-core EPYC with the registry reachable.
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, env=env, capture_output=True,
                              text=True, timeout=180)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"`npm ci` in examples/node failed (offline?): {last}")
    return binary


def _export(folder: Path, config: ModelConfig, parts: tuple[str, ...]) -> dict[str, Path]:
    (folder / "run").mkdir(parents=True)
    model = VAE(config).eval()
    save_checkpoint(folder / "run", model, config, new_record(config, TrainConfig(), cpu_plan(), epochs_done=1), {})
    paths = {part: folder / f"{part}.onnx" for part in parts}
    for part, path in paths.items():
        export_onnx(path, folder / "run", part, verify=False, log=lambda _: None)
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Decoder, encoder and vae exports of a grayscale model, and an RGB decoder (verification is skipped)."""
    folder = tmp_path_factory.mktemp("node-client")
    paths = _export(folder / "gray", GRAY, ("decoder", "encoder", "vae"))
    paths["rgb_decoder"] = _export(folder / "rgb", RGB, ("decoder",))["decoder"]
    truncated = folder / "truncated.onnx"
    truncated.write_bytes(paths["decoder"].read_bytes()[: paths["decoder"].stat().st_size // 2])
    paths["truncated"] = truncated
    return paths


def _node(node: str, script: str, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([node, script, *map(str, args)], cwd=CLIENT, capture_output=True, text=True, timeout=60)


def _ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("part", ["decoder", "rgb_decoder"])
def test_decode_matches_python(node: str, files: dict[str, Path], part: str, tmp_path: Path) -> None:
    vae = OnnxVAE(files[part], device="cpu")
    z = np.random.default_rng().standard_normal((7, vae.z_dim), dtype=np.float32)  # 7: a 3x3 grid, 2 empty
    np.save(tmp_path / "z.npy", z)
    _ok(_node(node, "sample.js", files[part], "--z", tmp_path / "z.npy", "--out", tmp_path / "grid.png",
              "--out-npy", tmp_path / "images.npy"))
    images, expected = np.load(tmp_path / "images.npy"), vae.decode(z)
    assert images.dtype == np.float32 and images.shape == expected.shape == (7, *vae.image_shape)
    np.testing.assert_allclose(images, expected, rtol=0, atol=ATOL)
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.size == (3 * 30 + 2, 3 * 30 + 2)
        assert picture.mode == ("L" if vae.image_shape[0] == 1 else "RGB")
        pixels = np.asarray(picture).astype(int)
    # Same layout as fastvae's grids; rounding at exact halves may differ by one level.
    assert np.abs(pixels - image_grid(expected, nrow=3)).max() <= 1


def test_sample_is_seeded(node: str, files: dict[str, Path], tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _ok(_node(node, "sample.js", files["decoder"], "--n", 16, "--seed", seed, "--out", tmp_path / f"{name}.png",
                  "--out-npy", tmp_path / f"{name}.npy"))
        runs[name] = np.load(tmp_path / f"{name}.npy")
    assert runs["a"].shape == (16, 1, 28, 28) and np.isfinite(runs["a"]).all()
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])
    with Image.open(tmp_path / "a.png") as picture:
        assert (picture.size, picture.mode) == ((4 * 30 + 2, 4 * 30 + 2), "L")


def test_reconstruct_with_mean_matches_python(node: str, files: dict[str, Path], tmp_path: Path) -> None:
    pixels = np.random.default_rng().integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)
    images = pixels.astype(np.float32) / 255
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "pixels.npy", pixels)
    session = ort.InferenceSession(files["vae"], providers=["CPUExecutionProvider"])
    (expected,) = session.run(["reconstruction"], {"images": images, "eps": np.zeros((6, GRAY.z_dim), np.float32)})
    for source in ("images", "pixels"):  # float32 in [0, 1], and uint8 divided by 255
        _ok(_node(node, "reconstruct.js", files["vae"], tmp_path / f"{source}.npy", "--mean",
                  "--out", tmp_path / f"{source}.png", "--out-npy", tmp_path / f"{source}-recon.npy"))
        np.testing.assert_allclose(np.load(tmp_path / f"{source}-recon.npy"), expected, rtol=0, atol=ATOL)
        with Image.open(tmp_path / f"{source}.png") as picture:  # originals above reconstructions
            assert (picture.size, picture.mode) == ((6 * 30 + 2, 2 * 30 + 2), "L")
            top = np.asarray(picture)[2:30, 2:30]
        np.testing.assert_array_equal(top, pixels[0, 0])
    _ok(_node(node, "reconstruct.js", files["vae"], tmp_path / "images.npy", "--seed", 3,
              "--out-npy", tmp_path / "noisy.npy"))
    assert not np.allclose(np.load(tmp_path / "noisy.npy"), expected, rtol=0, atol=ATOL)  # eps ~ N(0, I) is used


@pytest.mark.parametrize("case, expected", [
    ("encoder to sample.js", "holds the 'encoder' part"),
    ("decoder to reconstruct.js", "holds the 'decoder' part"),
    ("truncated", "truncated"),
    ("missing", "no such file"),
    ("bad option", "--n must be an integer"),
    ("float64 latents", "'<f8'"),
], ids=str)
def test_errors_are_one_line(node: str, files: dict[str, Path], case: str, expected: str, tmp_path: Path) -> None:
    np.save(tmp_path / "z64.npy", np.zeros((2, GRAY.z_dim)))
    np.save(tmp_path / "images.npy", np.zeros((2, 1, 28, 28), np.float32))
    out = tmp_path / "out.png"
    args = {
        "encoder to sample.js": ("sample.js", files["encoder"], "--out", out),
        "decoder to reconstruct.js": ("reconstruct.js", files["decoder"], tmp_path / "images.npy", "--out", out),
        "truncated": ("sample.js", files["truncated"], "--out", out),
        "missing": ("sample.js", tmp_path / "nowhere.onnx", "--out", out),
        "bad option": ("sample.js", files["decoder"], "--n", "0", "--out", out),
        "float64 latents": ("sample.js", files["decoder"], "--z", tmp_path / "z64.npy", "--out", out),
    }[case]
    done = _node(node, *args)
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert not out.exists()


def _python_ms(vae: OnnxVAE, batch: int, runs: int = 50, warmup: int = 10) -> float:
    z = np.random.default_rng(batch).standard_normal((batch, vae.z_dim), dtype=np.float32)
    for _ in range(warmup):
        vae.decode(z)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        vae.decode(z)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def test_decode_timing(node: str, files: dict[str, Path]) -> None:
    """Prints decode medians (50 runs after 10 warm-up) in Node and Python, same file and machine; asserts none."""
    done = _ok(_node(node, "bench.js", files["decoder"], "--batch", "1,64", "--runs", 50, "--warmup", 10))
    node_ms = {row["batch"]: row["median_ms"] for row in map(json.loads, done.stdout.splitlines())}
    whole, split = OnnxVAE(files["decoder"], device="cpu", split_batches=False), OnnxVAE(files["decoder"], device="cpu")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"\ndefault decoder (matmul graph), median ms of 50 decodes on {cpu}, {os.cpu_count()} CPUs, "
          f"onnxruntime {ort.__version__} (Python):")
    for batch in (1, 64):
        print(f"  batch {batch:2d}: node {node_ms[batch]:.3f} | python OnnxVAE.decode {_python_ms(split, batch):.3f}"
              f" | python split_batches=False {_python_ms(whole, batch):.3f}")
