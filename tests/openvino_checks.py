"""OnnxVAE(backend="openvino"): every exported part (matmul and conv decoder graphs, fp16 too) compiles in OpenVINO
with its dynamic batch and computes what the onnxruntime backend does, through the same API and input checks; the
runtime imports OpenVINO only when asked, and says how to install it when it is missing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not importable (pip install openvino)", exc_type=ImportError)

from fastvae import runtime  # noqa: E402 (after the skip)
from fastvae.checkpoint import save_checkpoint  # noqa: E402
from fastvae.config import ModelConfig, TrainConfig  # noqa: E402
from fastvae.export.exporter import export_onnx  # noqa: E402
from fastvae.model import VAE  # noqa: E402
from fastvae.plan import cpu_plan  # noqa: E402
from fastvae.run_folder import new_record  # noqa: E402
from fastvae.runtime import MAX_PIECE, OPENVINO_MIN_PIECE, OnnxVAE, batch_pieces  # noqa: E402

# Five exports and their compilations: ~20 s on a 2-core machine.
pytestmark = pytest.mark.slow

CONFIG = ModelConfig(z_dim=5)
# Max abs difference from the onnxruntime backend, by the file's precision: OpenVINO computes an fp16 file in fp32
# (INFERENCE_PRECISION_HINT f32), onnxruntime in fp16.
ATOL = {False: 1e-5, True: 1e-3}
# 2 streams, whatever the machine, so that batch 256 runs as four fixed-batch pieces of 64 and 253 as three of
# them and one on the dynamic-batch compilation.
STREAMS = 2
EXPORTS = {  # name: (part, decoder graph, fp16)
    "decoder": ("decoder", "matmul", False),
    "decoder-conv": ("decoder", "conv", False),
    "decoder-fp16": ("decoder", "matmul", True),
    "encoder": ("encoder", "matmul", False),
    "vae": ("vae", "matmul", False),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exports of one untrained model (verification is test_export's job, so it is skipped here)."""
    folder = tmp_path_factory.mktemp("openvino")
    (folder / "run").mkdir()
    model = VAE(CONFIG).eval()
    save_checkpoint(folder / "run", model, CONFIG, new_record(CONFIG, TrainConfig(), cpu_plan(), epochs_done=1), {})
    paths = {name: folder / f"{name}.onnx" for name in EXPORTS}
    for name, (part, graph, fp16) in EXPORTS.items():
        export_onnx(paths[name], folder / "run", part, decoder_graph=graph, fp16=fp16, verify=False,
                    log=lambda _: None)
    return paths


@pytest.fixture(scope="module")
def backends(files: dict[str, Path]) -> Iterator[dict[str, tuple[OnnxVAE, OnnxVAE]]]:
    """(openvino, onnxruntime) OnnxVAE pairs per export, each file compiled once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "physical_cores", lambda: STREAMS)
        yield {name: (OnnxVAE(path, device="cpu", backend="openvino"), OnnxVAE(path, device="cpu"))
               for name, path in files.items()}


def _images(n: int, seed: int) -> np.ndarray:
    shape = (n, CONFIG.im_chan, CONFIG.image_size, CONFIG.image_size)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_pieces_take_both_compilations() -> None:
    """The batches below cover one whole request, fixed-batch pieces only, and both kinds of piece; 130 (sampled
    below) takes dynamic-batch pieces only."""
    sizes = {batch: {stop - start for start, stop in batch_pieces(batch, STREAMS, OPENVINO_MIN_PIECE)}
             for batch in (7, 130, 253, 256)}
    assert sizes == {7: {7}, 130: {33, 31}, 253: {MAX_PIECE, 253 - 3 * MAX_PIECE}, 256: {MAX_PIECE}}


@pytest.mark.parametrize("name", list(EXPORTS))
@pytest.mark.parametrize("batch", [1, 7, 253, 256])
def test_equals_onnxruntime(backends: dict[str, tuple[OnnxVAE, OnnxVAE]], name: str, batch: int,
                            fresh_seed: int) -> None:
    openvino, onnxruntime = backends[name]
    assert openvino.provider == "OpenVINO CPU" and openvino.part == onnxruntime.part == EXPORTS[name][0]
    if openvino.part == "decoder":
        z = np.random.default_rng(fresh_seed).standard_normal((batch, CONFIG.z_dim), dtype=np.float32)
        pairs = [(openvino.decode(z), onnxruntime.decode(z))]
    else:
        images = _images(batch, fresh_seed)
        pairs = list(zip(openvino.encode(images), onnxruntime.encode(images), strict=True))
        if openvino.part == "vae":
            pairs.append((openvino.reconstruct(images, seed=fresh_seed),
                          onnxruntime.reconstruct(images, seed=fresh_seed)))
    for got, expected in pairs:
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL[EXPORTS[name][2]])


def test_sample_with_a_seed(backends: dict[str, tuple[OnnxVAE, OnnxVAE]]) -> None:
    """End to end through the public API: the same seed gives the same images on either backend."""
    openvino, onnxruntime = backends["decoder"]
    for n in (1, 130):
        np.testing.assert_allclose(openvino.sample(n, seed=3), onnxruntime.sample(n, seed=3), rtol=0, atol=1e-5)
    assert not np.array_equal(openvino.sample(4, seed=3), openvino.sample(4, seed=4))


def test_split_batches_false_runs_whole(files: dict[str, Path], backends: dict[str, tuple[OnnxVAE, OnnxVAE]]) -> None:
    whole = OnnxVAE(files["decoder"], device="cpu", split_batches=False, backend="openvino")
    z = np.random.default_rng(0).standard_normal((200, CONFIG.z_dim), dtype=np.float32)
    np.testing.assert_allclose(whole.decode(z), backends["decoder"][0].decode(z), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, call, expected", [
    ("decoder", lambda v: v.decode(np.zeros((2, 6), np.float32)), r"z must have shape \(B, 5\)"),
    ("decoder", lambda v: v.decode(np.zeros((2, 5), np.int64)), "must be a float array"),
    ("decoder", lambda v: v.decode(np.full((2, 5), np.nan, np.float32)), "NaN"),
    ("decoder", lambda v: v.sample(0), "positive integer"),
    ("decoder", lambda v: v.encode(_images(2, 0)), "needs a file exported with --part encoder or --part vae"),
    ("vae", lambda v: v.reconstruct(_images(2, 0) * 255), r"must lie in \[0, 1\]"),
    ("encoder", lambda v: v.reconstruct(_images(2, 0)), "--part vae.*holds the 'encoder' part"),
], ids=["z_dim", "int", "nan", "n", "encode-decoder", "range", "reconstruct-encoder"])
def test_same_input_checks(backends: dict[str, tuple[OnnxVAE, OnnxVAE]], name: str, call, expected: str) -> None:
    for vae in backends[name]:
        with pytest.raises(ValueError, match=expected):
            call(vae)


def test_bad_files_and_options(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(files["decoder"].read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        OnnxVAE(out, backend="openvino")
    with pytest.raises(ValueError, match="CPU only"):
        OnnxVAE(files["decoder"], device="cuda", backend="openvino")
    with pytest.raises(ValueError, match="backend must be one of onnxruntime, openvino"):
        OnnxVAE(files["decoder"], backend="tensorrt")


def test_missing_openvino_names_the_install(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "fastvae.openvino_backend", raising=False)
    with pytest.raises(ValueError, match="pip install openvino"):
        OnnxVAE(files["decoder"], backend="openvino")


def test_runtime_does_not_import_openvino(files: dict[str, Path]) -> None:
    code = ("import sys; from fastvae.runtime import OnnxVAE; "
            f"OnnxVAE({str(files['decoder'])!r}).sample(2, seed=0); assert 'openvino' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
