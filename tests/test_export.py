"""`fastvae export`: each part verified against PyTorch, a batch dimension that is really dynamic, fp16 within its
tolerance, the metadata contract, and an existing file kept when verification fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fastvae
from fastvae.checkpoint import save_checkpoint
from fastvae.cli import main
from fastvae.config import ModelConfig
from fastvae.export import verify
from fastvae.export.onnx import export_onnx, part_module
from fastvae.export.verify import TOLERANCE, random_inputs
from fastvae.model import VAE
from fastvae.runtime import INPUTS, OUTPUTS

# z_dim 12, not the default 32, so that no size is hard-coded anywhere.
CONFIG = ModelConfig(z_dim=12)


def make_checkpoint(folder: Path) -> tuple[Path, VAE]:
    """A run folder holding an untrained VAE whose BatchNorm statistics are not the identity, so that folding
    BatchNorm into the convolutions at export is exercised."""
    model = VAE(CONFIG)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True)
    save_checkpoint(folder, model, CONFIG, {"epochs_done": 3}, {})
    return folder, model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VAE]:
    return make_checkpoint(tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module", params=["decoder", "encoder", "vae", "vae-fp16"])
def exported(request: pytest.FixtureRequest, checkpoint: tuple[Path, VAE]) -> dict:
    """One verified export per part (each exported once per module); the fp16 one covers encoder and decoder."""
    part, _, precision = request.param.partition("-")
    out = checkpoint[0].parent / f"{request.param}.onnx"
    log: list[str] = []
    error = export_onnx(out, checkpoint[0], part, fp16=precision == "fp16", log=log.append)
    return {"path": out, "part": part, "fp16": precision == "fp16", "error": error, "log": log}


def test_verified_at_several_batches(exported: dict) -> None:
    assert 0 <= exported["error"] <= TOLERANCE[exported["fp16"]]
    lines = "\n".join(exported["log"])
    for batch in verify.BATCHES:
        for name in OUTPUTS[exported["part"]]:
            assert f"batch {batch:>3} {name}" in lines, lines
    assert "CPUExecutionProvider" in lines or "CUDAExecutionProvider" in lines


def test_batch_is_dynamic(exported: dict, checkpoint: tuple[Path, VAE]) -> None:
    proto = onnx.load(exported["path"])
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param, f"{value.name}: batch pinned at export"
    session = ort.InferenceSession(exported["path"], providers=["CPUExecutionProvider"])
    reference = part_module(checkpoint[1], exported["part"])
    for batch in (1, 3, 33):  # the export's example batch is 2
        inputs = random_inputs(exported["part"], CONFIG, batch)
        got = session.run(None, {n: x.numpy() for n, x in zip(INPUTS[exported["part"]], inputs, strict=True)})
        with torch.no_grad():
            want = reference(*inputs)
        for actual, expected in zip(got, want if isinstance(want, tuple) else (want,), strict=True):
            assert actual.shape[0] == batch
            np.testing.assert_allclose(actual, expected.numpy(), rtol=0, atol=TOLERANCE[exported["fp16"]])
    if exported["part"] == "decoder":  # one file serves a large batch too
        (images,) = session.run(None, {"z": np.random.default_rng(0).standard_normal((4096, 12), dtype=np.float32)})
        assert images.shape == (4096, 1, 28, 28) and 0 <= images.min() and images.max() <= 1


def test_metadata_round_trip(exported: dict, checkpoint: tuple[Path, VAE]) -> None:
    proto = onnx.load(exported["path"])
    meta = {p.key: p.value for p in proto.metadata_props}
    part = exported["part"]
    assert meta["fastvae.part"] == part
    assert meta["fastvae.z_dim"] == "12"
    assert json.loads(meta["fastvae.image_shape"]) == [1, 28, 28]
    assert list(json.loads(meta["fastvae.inputs"])) == list(INPUTS[part])
    assert list(json.loads(meta["fastvae.outputs"])) == list(OUTPUTS[part])
    assert meta["fastvae.version"] == fastvae.__version__
    assert meta["fastvae.checkpoint"] == str(checkpoint[0].resolve())
    assert meta["fastvae.epoch"] == "3"
    assert meta["fastvae.precision"] == ("float16" if exported["fp16"] else "float32")
    assert float(meta["fastvae.parity"].split()[0]) == pytest.approx(exported["error"], rel=1e-2)
    # onnxruntime, which other apps use, reads the same map
    session = ort.InferenceSession(exported["path"], providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == meta
    assert [i.name for i in session.get_inputs()] == list(INPUTS[part])
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS[part])


def test_fp16_weights_float32_boundary(exported: dict) -> None:
    proto = onnx.load(exported["path"])
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    # Weight matrices; the matmul decoder's 0/1 overlap matrices are bool and its pixel orders int64.
    weights = {t.data_type for t in proto.graph.initializer if len(t.dims) > 1 and t.data_type in floating}
    assert weights == ({onnx.TensorProto.FLOAT16} if exported["fp16"] else {onnx.TensorProto.FLOAT})
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_decoder_graph_choice(exported: dict, checkpoint: tuple[Path, VAE], tmp_path: Path) -> None:
    """The default graph has no ConvTranspose (the decoder is matrix products); "conv" keeps them, verified."""
    assert "ConvTranspose" not in {node.op_type for node in onnx.load(exported["path"]).graph.node}
    if exported["part"] != "decoder":
        return
    out = tmp_path / "conv.onnx"
    error = export_onnx(out, checkpoint[0], "decoder", decoder_graph="conv", log=lambda _: None)
    assert 0 <= error <= TOLERANCE[False]
    proto = onnx.load(out)
    assert "ConvTranspose" in {node.op_type for node in proto.graph.node}
    assert {p.key: p.value for p in proto.metadata_props}["fastvae.decoder_graph"] == "conv"


def _one_line_error(capsys: pytest.CaptureFixture[str], *expected: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def test_failed_verification_keeps_existing_file(
    checkpoint: tuple[Path, VAE], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "encoder.onnx"
    out.write_bytes(b"the previous export")
    argv = ["export", str(out), "--checkpoint", str(checkpoint[0]), "--part", "encoder"]
    with monkeypatch.context() as patch:
        patch.setitem(TOLERANCE, False, -1.0)  # no graph can pass
        assert main(argv) == 2
    _one_line_error(capsys, "differs from PyTorch")
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx"]  # no temp file left behind
    assert main(argv) == 0
    assert onnx.load(out).metadata_props  # replaced by the verified export


@pytest.mark.parametrize("argv, expected", [
    (["--opset", "12"], "--opset 12 is not supported"),
    (["--checkpoint", "no-such-run"], "no checkpoint at no-such-run"),
    (["--decoder-graph", "dense"], "unknown decoder graph 'dense': choose one of matmul, conv"),
], ids=["opset", "checkpoint", "decoder-graph"])
def test_bad_options(argv: list[str], expected: str, checkpoint: tuple[Path, VAE], tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "m.onnx"), "--checkpoint", str(checkpoint[0]), *argv]) == 2
    _one_line_error(capsys, expected)
    assert not (tmp_path / "m.onnx").exists()
