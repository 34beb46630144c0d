"""Frozen dataclasses for the model's shape and the training run's settings, and every option's choices."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from fastvae.errors import FastVAEError
from fastvae.malloc import ALLOCATORS

if TYPE_CHECKING:
    import torch

# The lab's layers map 28x28 to a 1x1 code and back; they are not size-generic.
SUPPORTED_IMAGE_SIZE = 28

# The choices of each option, here alone: argparse's choices= and the checks below read them.
DATASETS = ("fashion-mnist", "mnist")
DEVICES = ("auto", "cpu", "cuda")
MODELS = ("fast", "reference")
LAYERS = ("auto", "matmul", "library")  # see fastvae.plan
KERNELS = ("auto", "triton", "torch")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune")  # see fastvae.plan
PARTS = ("decoder", "encoder", "vae")  # what `fastvae export` writes
DECODER_GRAPHS = ("matmul", "conv")  # the exported decoder's form


@dataclass(frozen=True)
class ModelConfig:
    z_dim: int = 32
    im_chan: int = 1
    image_size: int = SUPPORTED_IMAGE_SIZE
    encoder_hidden: int = 16
    decoder_hidden: int = 64

    def __post_init__(self) -> None:
        if self.z_dim < 1:
            raise FastVAEError(f"z_dim must be at least 1, got {self.z_dim}")
        if self.im_chan < 1:
            raise FastVAEError(f"image channels must be at least 1, got {self.im_chan}")
        if self.image_size != SUPPORTED_IMAGE_SIZE:
            raise FastVAEError(
                f"image size {self.image_size}x{self.image_size} is not supported: the lab's "
                f"encoder and decoder are built for {SUPPORTED_IMAGE_SIZE}x{SUPPORTED_IMAGE_SIZE}; "
                "resize your images to 28x28"
            )


@dataclass(frozen=True)
class TrainConfig:
    data: str = "fashion-mnist"  # a dataset name, or a folder of images or a .npy / .npz array (fastvae.images)
    data_dir: str | None = None
    channels: int | None = None  # 1 or 3; None: the source's own
    test_fraction: float | None = None  # held out of a source without a test split (None: fastvae.splits' default)
    test_data: str | None = None  # or a test source of its own
    skip_bad: bool = False  # skip unreadable image files instead of stopping at the first
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 2e-3
    beta: float = 1.0
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "auto"
    amp: bool = False
    model: str = "fast"
    limit_train: int | None = None
    layers: str = "auto"
    kernel: str = "auto"
    sync_bn: bool = False
    dist_timeout: float = 300.0
    cpu_allocator: str = "cached"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise FastVAEError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.epochs < 1:
            raise FastVAEError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise FastVAEError(f"--lr must be positive, got {self.lr}")
        if not self.beta >= 0:
            raise FastVAEError(f"--beta must be non-negative, got {self.beta}")
        if self.limit_train is not None and self.limit_train < 1:
            raise FastVAEError(f"--limit-train must be at least 1, got {self.limit_train}")
        if self.channels is not None and self.channels not in (1, 3):
            raise FastVAEError(f"--channels must be 1 or 3, got {self.channels}")
        if self.test_fraction is not None and not 0 < self.test_fraction < 1:
            raise FastVAEError(f"--test-fraction must lie strictly between 0 and 1, got {self.test_fraction}")
        if self.test_fraction is not None and self.test_data is not None:
            raise FastVAEError("--test-fraction and --test-data both say where the test images come from: give one")
        for option, value, choices in (("device", self.device, DEVICES),
                                       ("model", self.model, MODELS), ("layers", self.layers, LAYERS),
                                       ("kernel", self.kernel, KERNELS),
                                       ("compile-mode", self.compile_mode, COMPILE_MODES),
                                       ("cpu-allocator", self.cpu_allocator, ALLOCATORS)):
            if value not in choices:
                raise FastVAEError(f"--{option} must be one of {', '.join(choices)}, got {value!r}")
        if not self.dist_timeout > 0:
            raise FastVAEError(f"--dist-timeout must be positive, got {self.dist_timeout}")


@dataclass(frozen=True)
class RunPlan:
    """What a run executes, each choice with its reason; made by fastvae.plan.make_plan."""

    device: str  # "cpu", "cuda", "cuda:1"
    distributed: bool  # under torchrun (DistributedDataParallel)
    world_size: int
    model: str  # "fast" or "reference" (the lab's code)
    layers: str | None  # the fast model's convolutions: "matmul" (custom ops) or "library"; None for the lab's
    kernel: str  # reparameterize + KL: "triton" or "torch"
    amp_dtype: str | None  # "bfloat16", "float16" or None (fp32)
    compile: bool
    compile_mode: str | None  # torch.compile's mode; None without --compile
    fullgraph: bool
    cuda_graph: bool  # the whole step (forward, backward, Adam) captured once and replayed as one CUDA graph
    cpu_allocator: str | None  # glibc's setting on the CPU ("cached" or "system"); None elsewhere
    sync_bn: bool
    # Adam's implementation: "fused" (one kernel over all parameters; CUDA) or "default" (PyTorch's for the
    # device). A record written before the choice existed ran the default.
    optimizer: str = "default"
    reasons: dict[str, str] = field(default_factory=dict)  # choice -> why

    @property
    def torch_device(self) -> torch.device:
        import torch  # here, not at the top: the command line reads configs before it imports torch

        return torch.device(self.device)

    @property
    def torch_amp_dtype(self) -> torch.dtype | None:
        import torch

        return getattr(torch, self.amp_dtype) if self.amp_dtype else None

    def describe(self) -> str:
        """One line per choice with its reason, as the trainer prints it at start."""
        choices = {k: v for k, v in asdict(self).items() if k != "reasons"}
        return "\n".join(f"  {name}: {value}" + (f" ({self.reasons[name]})" if name in self.reasons else "")
                         for name, value in choices.items())
