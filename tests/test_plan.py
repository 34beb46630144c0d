"""The run plan: every choice made once, with its reason, per device; what cannot work is refused in one line."""

from __future__ import annotations

import pytest
import torch

from fastvae import plan as plan_module
from fastvae.config import TrainConfig
from fastvae.distributed import Launch
from fastvae.errors import FastVAEError
from fastvae.plan import make_plan


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans made as on a machine with a bf16 GPU and Triton (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "a test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_: True)
    monkeypatch.setattr(plan_module, "triton_installed", lambda: True)


def test_cpu_defaults() -> None:
    plan = make_plan(TrainConfig(device="cpu", compile=True))
    assert (plan.device, plan.layers, plan.kernel, plan.amp_dtype) == ("cpu", "matmul", "torch", None)
    assert (plan.compile_mode, plan.cuda_graph, plan.fullgraph, plan.cpu_allocator) == ("default", False, True,
                                                                                        "cached")
    assert plan.optimizer == "default"
    for choice in ("device", "layers", "kernel", "amp_dtype", "compile_mode", "optimizer", "cpu_allocator"):
        assert plan.reasons[choice], choice
        assert f"{choice}: " in plan.describe()


def test_gpu_defaults(gpu: None) -> None:
    plan = make_plan(TrainConfig(compile=True, amp=True))
    assert (plan.device, plan.layers, plan.kernel, plan.amp_dtype) == ("cuda", "library", "triton", "bfloat16")
    assert (plan.compile_mode, plan.cuda_graph, plan.cpu_allocator, plan.optimizer) == ("default", True, None,
                                                                                          "fused")
    assert "a test GPU" in plan.reasons["device"]


@pytest.mark.parametrize("launch, bf16, expected", [
    (Launch(0, 2, 0, distributed=True), True, "single-process"),
    (Launch(), False, "fp16"),
], ids=["torchrun", "fp16"])
def test_gpu_without_cuda_graphs(gpu: None, monkeypatch: pytest.MonkeyPatch, launch: Launch, bf16: bool,
                                 expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_: bf16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    plan = make_plan(TrainConfig(compile=True, amp=True), launch)
    assert not plan.cuda_graph and expected in plan.reasons["compile_mode"]


def test_choices_asked_for_win(gpu: None) -> None:
    plan = make_plan(TrainConfig(layers="matmul", kernel="torch", compile=True, compile_mode="max-autotune"))
    assert (plan.layers, plan.kernel, plan.compile_mode, plan.cuda_graph) == ("matmul", "torch",
                                                                              "max-autotune-no-cudagraphs", True)
    assert make_plan(TrainConfig(device="cpu", layers="library")).layers == "library"


def test_reference_plan() -> None:
    plan = make_plan(TrainConfig(device="cpu", model="reference", compile=True))
    assert (plan.layers, plan.kernel, plan.fullgraph) == (None, "torch", False)


@pytest.mark.parametrize("config, message", [
    (TrainConfig(device="cpu", kernel="triton"), "--kernel triton: "),
    (TrainConfig(device="cpu", model="reference", amp=True), "--amp needs --model fast"),
    (TrainConfig(device="cpu", model="reference", kernel="torch", layers="matmul"), "--layers matmul needs"),
    (TrainConfig(device="cpu", compile_mode="max-autotune"), "--compile-mode max-autotune needs --compile"),
    (TrainConfig(device="cpu", sync_bn=True), "--sync-bn"),
    (TrainConfig(device="cpu", batch_size=15), "divide evenly"),
], ids=["triton-on-cpu", "reference-amp", "reference-layers", "mode-without-compile", "sync-bn", "uneven-batch"])
def test_refusals(config: TrainConfig, message: str) -> None:
    launch = Launch(0, 2, 0, distributed=True) if config.batch_size == 15 else Launch()
    with pytest.raises(FastVAEError, match=message):
        make_plan(config, launch)
