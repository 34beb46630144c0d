"""Decoder and encoder inference at batch 1, 64 and 1024: the lab's eager model, fastvae eager, torch.compile and
onnxruntime (CPU; CUDA through IO binding when a GPU is present), side by side on the same weights."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bench.throughput import record_throughput
from fastvae import reference
from fastvae.checkpoint import save_checkpoint
from fastvae.config import ModelConfig, TrainConfig
from fastvae.export.exporter import DECODER_GRAPHS, export_onnx, part_module
from fastvae.flops import forward_flops
from fastvae.model import VAE
from fastvae.plan import cpu_plan
from fastvae.run_folder import new_record
from fastvae.runtime import OnnxVAE, gpu_present

PARTS = ("decoder", "encoder")
BATCHES = (1, 64, 1024)
# onnxruntime-cpu runs the default export (the decoder as matrix products) through fastvae.runtime.OnnxVAE, which
# splits large batches across the cores; -whole-batch runs each batch whole on onnxruntime's own threads
# (split_batches=False), and -conv-graph the decoder exported with standard ConvTranspose nodes (--decoder-graph
# conv): they show what each of the two buys.
PATHS = ("reference-eager", "fastvae-eager", "fastvae-compile", "onnxruntime-cpu", "onnxruntime-cpu-whole-batch",
         "onnxruntime-cpu-conv-graph", "onnxruntime-cuda")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # of the PyTorch paths


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One set of weights in every form: the reference and fast modules, and an ONNX file per part."""
    torch.manual_seed(0)
    config = ModelConfig()
    fast = VAE(config).eval()
    lab = reference.VAE(config).eval()
    lab.load_state_dict(fast.state_dict())
    folder = tmp_path_factory.mktemp("bench-inference")
    (folder / "run").mkdir()
    save_checkpoint(folder / "run", fast, config, new_record(config, TrainConfig(), cpu_plan()), {})
    onnx_files = {(part, graph): folder / f"{part}-{graph}.onnx" for part in PARTS for graph in DECODER_GRAPHS}
    for (part, graph), path in onnx_files.items():  # test_export verifies parity; here only speed is measured
        export_onnx(path, folder / "run", part, decoder_graph=graph, verify=False, log=lambda _: None)
    return {"config": config, "fast": fast.to(DEVICE), "reference": lab.to(DEVICE), "onnx": onnx_files}


def _torch_call(module: Callable[..., Any], inputs: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            out = module(inputs)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # time the work, not the launch
        return out

    return call


def _onnx_call(path: Path, part: str, device: str, inputs: np.ndarray, split: bool = True) -> Callable[[], Any]:
    vae = OnnxVAE(path, device=device, split_batches=split)
    return (lambda: vae.decode(inputs)) if part == "decoder" else (lambda: vae.encode(inputs))


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if "compile" in p else p for p in PATHS])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("part", PARTS)
def test_inference(benchmark: Any, part: str, batch: int, path: str, models: dict[str, Any], machine: dict,
                   matmul_gflops: float) -> None:
    config = models["config"]
    generator = torch.Generator().manual_seed(batch)
    if part == "decoder":
        inputs = torch.randn(batch, config.z_dim, generator=generator)
    else:
        inputs = torch.rand(batch, config.im_chan, config.image_size, config.image_size, generator=generator)
    first_call_s, device = None, DEVICE.type
    if path == "reference-eager":
        call = _torch_call(getattr(models["reference"], "decode" if part == "decoder" else "encode"), inputs.to(DEVICE))
    elif path == "fastvae-eager":
        call = _torch_call(part_module(models["fast"], part, decoder_graph="conv"), inputs.to(DEVICE))
    elif path == "fastvae-compile":
        if benchmark.disabled:
            pytest.skip("torch.compile takes ~30-60 s per shape on 2 cores; timed runs only (--benchmark-enable)")
        torch.compiler.reset()  # so the first call below really compiles this shape
        module = part_module(models["fast"], part, decoder_graph="conv")
        call = _torch_call(torch.compile(module, dynamic=False), inputs.to(DEVICE))
        start = time.perf_counter()
        call()
        first_call_s = round(time.perf_counter() - start, 2)
    elif path.startswith("onnxruntime-cpu"):
        if path.endswith("conv-graph") and part != "decoder":
            pytest.skip("--decoder-graph changes the decoder only; the encoder's graph is the same")
        device = "cpu"
        graph = "conv" if path.endswith("conv-graph") else "matmul"
        call = _onnx_call(models["onnx"][part, graph], part, device, inputs.numpy(), not path.endswith("whole-batch"))
    else:
        if not ("CUDAExecutionProvider" in ort.get_available_providers() and gpu_present()):
            pytest.skip("onnxruntime-cuda needs a CUDA GPU and onnxruntime's CUDA provider; this machine lacks one")
        device = "cuda"
        call = _onnx_call(models["onnx"][part, "matmul"], part, device, inputs.numpy())

    benchmark.group = f"{part} inference batch {batch}"
    benchmark(call)
    record_throughput(benchmark, flops=forward_flops(config)[part] * batch, items=batch, ceiling=matmul_gflops,
                      path=path, part=part, batch=batch, dtype="fp32", device=device, first_call_s=first_call_s,
                      onnxruntime=ort.__version__, **machine)
