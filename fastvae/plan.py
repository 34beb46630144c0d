"""Making the run plan (fastvae.config.RunPlan): what a run executes (device, model, layers, kernel, precision,
compile, allocator, processes), decided once from TrainConfig and the launch, each choice with its reason.
Training, eval, export and the benchmarks all build from a plan, so a benchmark times what `fastvae train` runs.
"""

from __future__ import annotations

import torch

from fastvae.config import RunPlan, TrainConfig
from fastvae.distributed import Launch, check_options, rank_device
from fastvae.errors import FastVAEError
from fastvae.kernels import triton_installed


def resolve_device(name: str) -> tuple[torch.device, str]:
    if name == "cuda" and not torch.cuda.is_available():
        raise FastVAEError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if name != "auto":
        return torch.device(name), "asked for"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"auto: {torch.cuda.get_device_name()}"
    return torch.device("cpu"), "auto: no CUDA GPU"


def _layers(config: TrainConfig, device: torch.device) -> tuple[str | None, str]:
    if config.model == "reference":
        if config.layers != "auto":
            raise FastVAEError(f"--layers {config.layers} needs --model fast: the lab's model has its own layers")
        return None, "the lab's own layers"
    if config.layers != "auto":
        return config.layers, "asked for"
    if device.type == "cpu":
        # NOTE: 2-core Xeon: oneDNN ran this model's small transposed convolutions at ~40% of matmul speed;
        # as matmul custom ops (+ Winograd for the stride-1 layer) the training step was 1.6x faster.
        return "matmul", "auto: on the CPU, convolutions as matmul custom ops and Winograd beat oneDNN's"
    return "library", "auto: on a GPU, the library's cuDNN convolutions, which inductor fuses around"


def _kernel(config: TrainConfig, device: torch.device) -> tuple[str, str]:
    if config.model == "reference":
        if config.kernel == "triton":
            raise FastVAEError("--kernel triton needs --model fast: the lab's model has no fused kernel")
        return "torch", "the lab's code; eps from counter_normal"
    if config.kernel == "torch":
        return "torch", "asked for"
    if config.kernel == "triton":
        if not triton_installed():
            raise FastVAEError("--kernel triton: Triton is not installed (torch ships it for Linux only); "
                               "use --kernel auto or torch")
        if device.type != "cuda":
            raise FastVAEError(f"--kernel triton: the Triton kernels need a CUDA device, this run is on "
                               f"{device.type}; use --kernel auto or torch")
        return "triton", "asked for"
    if device.type != "cuda":
        return "torch", f"auto: {device.type} tensors; the Triton kernels run on CUDA only"
    if not triton_installed():
        return "torch", "auto: Triton is not installed"
    return "triton", "auto: CUDA tensors"


def _amp_dtype(config: TrainConfig, device: torch.device) -> tuple[str | None, str]:
    if not config.amp:
        return None, "fp32: no --amp"
    if config.model == "reference":
        raise FastVAEError("--amp needs --model fast: the lab's Sigmoid + BCELoss is unsafe under autocast")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "--amp on a GPU with bf16"
        return "float16", "--amp on a GPU without bf16: fp16 with a gradient scaler"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16", "--amp; this CPU has no native bf16, so it runs slower than fp32"
    return "bfloat16", "--amp"


def _compile_mode(config: TrainConfig, device: torch.device, launch: Launch,
                  amp_dtype: str | None) -> tuple[str | None, bool, str]:
    """(torch.compile's mode, whether the whole step is one CUDA graph, why).

    fastvae's "reduce-overhead" and "max-autotune" capture the whole step, Adam included, as one CUDA graph of
    its own; torch's own modes of those names graph the forward and the backward apart and leave the optimizer
    out, so inductor runs without its CUDA graphs inside (its "default" / "max-autotune-no-cudagraphs").
    """
    if not config.compile:
        if config.compile_mode != "auto":
            raise FastVAEError(f"--compile-mode {config.compile_mode} needs --compile")
        return None, False, "n/a: no --compile"
    mode = config.compile_mode
    if mode == "auto":
        # NOTE: not measured here (no GPU yet; `make gpu-check` measures it). The published anchor: a whole-step
        # CUDA graph of a small MNIST CNN's training step ran >6x faster, launch overhead being the cost.
        mode, why = ("reduce-overhead", "auto: a GPU runs this small step faster as one replayed graph") \
            if device.type == "cuda" else ("default", "auto: CUDA graphs need a GPU")
    else:
        why = "asked for"
    inductor = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
    if mode == "default":
        return inductor, False, why
    if device.type != "cuda":
        return inductor, False, f"{why}; no CUDA graph off a GPU"
    if launch.world_size > 1:
        return inductor, False, f"{why}; whole-step CUDA graphs are single-process (torchrun: none)"
    if amp_dtype == "float16":
        return inductor, False, f"{why}; fp16: the gradient scaler has not been tested inside a CUDA graph, so none"
    return inductor, True, f"{why}: the whole step replays as one CUDA graph"


def _optimizer(device: torch.device) -> tuple[str, str]:
    if device.type != "cuda":
        return "default", "PyTorch's Adam for CPU tensors"
    # As the GPU world runs Adam (nanoGPT, gpt-fast): the fused kernel updates every parameter in one launch, and
    # with it the fp16 gradient scaler passes its inf flag to the kernel instead of reading it on the host.
    return "fused", "on a GPU: one fused kernel for all parameters; the fp16 scaler's inf check stays on the GPU"


def make_plan(config: TrainConfig, launch: Launch = Launch()) -> RunPlan:
    """Every choice of a run, checked: a FastVAEError names an option that cannot work here."""
    device, device_reason = resolve_device(config.device)
    device = rank_device(device, launch)
    check_options(config, launch, device)
    layers, layers_reason = _layers(config, device)
    kernel, kernel_reason = _kernel(config, device)
    amp_dtype, amp_reason = _amp_dtype(config, device)
    compile_mode, cuda_graph, compile_reason = _compile_mode(config, device, launch, amp_dtype)
    optimizer, optimizer_reason = _optimizer(device)
    # The lab's code calls torch.distributions.kl_divergence, whose type dispatch dynamo cannot trace: it
    # compiles in pieces around it. SyncBatchNorm breaks the graph too (pytorch/pytorch#161302).
    fullgraph = config.compile and config.model == "fast" and not config.sync_bn
    allocator = config.cpu_allocator if device.type == "cpu" else None
    reasons = {
        "device": device_reason, "layers": layers_reason, "kernel": kernel_reason, "amp_dtype": amp_reason,
        "compile_mode": compile_reason, "optimizer": optimizer_reason,
        "fullgraph": "the whole step is one graph" if fullgraph else
        "n/a" if not config.compile else "the lab's kl_divergence or SyncBatchNorm split the graph",
        "cpu_allocator": "glibc keeps freed memory for the next step" if allocator == "cached" else
        "glibc's defaults" if allocator else "not a CPU run",
    }
    return RunPlan(str(device), launch.distributed, launch.world_size, config.model, layers, kernel, amp_dtype,
                   config.compile, compile_mode, fullgraph, cuda_graph, allocator, config.sync_bn,
                   optimizer=optimizer, reasons=reasons)


def cpu_plan() -> RunPlan:
    """The plan of a default run on the CPU: what export and tools that only read weights build the model with."""
    return make_plan(TrainConfig(device="cpu"))
