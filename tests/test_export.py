"""`fastvae export`: each part verified against PyTorch, a batch dimension that is really dynamic, fp16 within its
tolerance, the metadata contract, and an existing file kept when verification fails, when the checkpoint holds
NaN, or when the output path cannot be written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fastvae
from fastvae.checkpoint import save_checkpoint
from fastvae.cli import main
from fastvae.config import ModelConfig, TrainConfig
from fastvae.errors import FastVAEError
from fastvae.export import verify
from fastvae.export.exporter import export_onnx, export_part, part_module
from fastvae.export.verify import TOLERANCE, random_inputs, verify_onnx
from fastvae.model import VAE
from fastvae.plan import cpu_plan
from fastvae.run_folder import new_record
from fastvae.runtime import INPUTS, OUTPUTS

# z_dim 12, not the default 32, so that no size is hard-coded anywhere.
CONFIG = ModelConfig(z_dim=12)


def make_checkpoint(folder: Path, poison: dict[str, float] | None = None) -> tuple[Path, VAE]:
    """A run folder holding an untrained VAE whose BatchNorm statistics are not the identity, so that folding
    BatchNorm into the convolutions at export is exercised; `poison` sets one element of each named tensor."""
    model = VAE(CONFIG)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        state = model.state_dict()  # shares storage with the model
        for name, value in (poison or {}).items():
            state[name].view(-1)[0] = value
    folder.mkdir(parents=True)
    save_checkpoint(folder, model, CONFIG, new_record(CONFIG, TrainConfig(), cpu_plan(), epochs_done=3), {})
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
    errors = [float(e) for e in re.findall(r"batch +\d+ \S+ +max abs error (\S+)", lines)]
    assert len(errors) == len(verify.BATCHES) * len(OUTPUTS[exported["part"]])
    assert exported["error"] == pytest.approx(max(errors), rel=1e-2)  # the largest of all, not of a few
    for batch in verify.BATCHES:
        for name in OUTPUTS[exported["part"]]:
            assert f"batch {batch:>3} {name}" in lines, lines
    assert "CPUExecutionProvider" in lines or "CUDAExecutionProvider" in lines


def test_batch_is_dynamic(exported: dict, checkpoint: tuple[Path, VAE]) -> None:
    proto = onnx.load(exported["path"])
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param, f"{value.name}: batch pinned at export"
    session = ort.InferenceSession(exported["path"], providers=["CPUExecutionProvider"])
    reference = part_module(checkpoint[1], exported["part"], decoder_graph="conv")
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
    """The default graph's decoder is matrix products, without ConvTranspose; "conv" keeps them, verified. The
    encoder has no decoder: its graph keeps ONNX's Conv and says so in its metadata."""
    proto = onnx.load(exported["path"])
    ops = {node.op_type for node in proto.graph.node}
    graph = {p.key: p.value for p in proto.metadata_props}["fastvae.decoder_graph"]
    if exported["part"] == "encoder":
        assert "Conv" in ops and "ConvTranspose" not in ops and graph == "none", (ops, graph)
        return
    assert "ConvTranspose" not in ops and {"MatMul", "Gemm"} & ops and graph == "matmul", (ops, graph)
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
    (["--decoder-graph", "dense"], "argument --decoder-graph: invalid choice: 'dense' (choose from 'matmul', 'conv')"),
], ids=["opset", "checkpoint", "decoder-graph"])
def test_bad_options(argv: list[str], expected: str, checkpoint: tuple[Path, VAE], tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "m.onnx"), "--checkpoint", str(checkpoint[0]), *argv]) == 2
    _one_line_error(capsys, expected)
    assert not (tmp_path / "m.onnx").exists()


def _poisoned(model: bytes) -> bytes:
    """`model` with its largest float initializer (a weight matrix) all NaN."""
    proto = onnx.load_from_string(model)
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    weight = max(floats, key=lambda t: np.prod(t.dims))
    weight.CopyFrom(onnx.numpy_helper.from_array(np.full(tuple(weight.dims), np.nan, np.float32), weight.name))
    return proto.SerializeToString()


class _NaNAtBatch(torch.nn.Module):
    """`reference`, except that at batch `batch` one output pixel is NaN."""

    def __init__(self, reference: torch.nn.Module, batch: int) -> None:
        super().__init__()
        self.reference, self.batch = reference, batch

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        images = self.reference(z)
        if len(z) == self.batch:
            images[0, 0, 0, 0] = float("nan")
        return images


@pytest.fixture(scope="module")
def decoder_onnx(checkpoint: tuple[Path, VAE]) -> bytes:
    return export_part(checkpoint[1], "decoder").SerializeToString()


@pytest.mark.parametrize("side", ["PyTorch", "onnxruntime"])
def test_verify_fails_on_non_finite_output(decoder_onnx: bytes, checkpoint: tuple[Path, VAE], side: str) -> None:
    """NaN on either side fails, naming the part, output, batch and side: max() alone would drop it."""
    reference = part_module(checkpoint[1], "decoder", decoder_graph="conv")
    if side == "PyTorch":
        model, reference, batch = decoder_onnx, _NaNAtBatch(reference, 7), 7
    else:
        model, batch = _poisoned(decoder_onnx), verify.BATCHES[0]
    with pytest.raises(FastVAEError) as error:
        verify_onnx(model, reference, "decoder", CONFIG, fp16=False, log=lambda _: None)
    assert str(error.value) == (f"verification failed: decoder output 'images' at batch {batch} is not finite in "
                                f"{side} (NaN or inf); the file was not written")


def _forbid(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make a call of `target` (a dotted name) fail the test: the check under test must refuse before it."""
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{target} was called: the check came too late")

    monkeypatch.setattr(target, fail)


@pytest.mark.parametrize("name, value", [("decode.gen.3.0.bias", float("nan")),
                                         ("encode.disc.0.1.running_var", float("inf"))], ids=["bias", "bn-buffer"])
def test_non_finite_checkpoint_is_refused(name: str, value: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = make_checkpoint(tmp_path / "run", poison={name: value})
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    _forbid(monkeypatch, "fastvae.export.exporter.export_part")
    assert main(["export", str(out), "--checkpoint", str(run), "--part", "vae"]) == 2
    _one_line_error(capsys, f"{run}: weight {name} holds NaN or infinity; this checkpoint cannot be exported "
                            "(train again or use an earlier run)")
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "run"]


def test_nan_weights_fail_verification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Past the weight check, the NaN reaches both outputs, and verification refuses the file by itself."""
    run, _ = make_checkpoint(tmp_path / "run", poison={"decode.gen.3.0.bias": float("nan")})
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr("fastvae.export.exporter.check_finite_weights", lambda *_: None)
    assert main(["export", str(out), "--checkpoint", str(run)]) == 2
    _one_line_error(capsys, "verification failed: decoder output 'images' at batch 1 is not finite in PyTorch and "
                            "onnxruntime (NaN or inf); the file was not written")
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "run"]


@pytest.mark.parametrize("make, out, expected", [
    (lambda d: (d / "out").mkdir(), "out", "(the ONNX file): it is a directory; give a file name, not a folder"),
    (lambda d: (d / "blocker").write_text("keep me"), "blocker/sub/model.onnx",
     "(the ONNX file): {d}/blocker is a file, not a folder; choose another path"),
], ids=["directory", "file-in-the-way"])
def test_unwritable_output_is_refused_first(make, out: str, expected: str, checkpoint: tuple[Path, VAE],
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    _forbid(monkeypatch, "fastvae.export.exporter.load_model")
    assert main(["export", str(tmp_path / out), "--checkpoint", str(checkpoint[0])]) == 2
    _one_line_error(capsys, f"cannot write {tmp_path / out} ", expected.format(d=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused_first(checkpoint: tuple[Path, VAE], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    _forbid(monkeypatch, "fastvae.export.exporter.load_model")
    assert main(["export", str(folder / "model.onnx"), "--checkpoint", str(checkpoint[0])]) == 2
    _one_line_error(capsys, f"the folder {folder} is not writable")
    assert list(folder.iterdir()) == []


def test_missing_output_folders_are_created(checkpoint: tuple[Path, VAE], tmp_path: Path) -> None:
    out = tmp_path / "new" / "folders" / "encoder.onnx"
    assert export_onnx(out, checkpoint[0], "encoder", verify=False, log=lambda _: None) is None
    assert onnx.load(out).metadata_props
