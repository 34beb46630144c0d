"""Frozen dataclasses for the model's shape and the training run's settings."""

from __future__ import annotations

from dataclasses import dataclass

from fastvae.errors import FastVAEError
from fastvae.malloc import ALLOCATORS

# The lab's layers map 28x28 to a 1x1 code and back; they are not size-generic.
SUPPORTED_IMAGE_SIZE = 28


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
    data: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 2e-3
    beta: float = 1.0
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    amp: bool = False
    model: str = "fast"
    limit_train: int | None = None
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
        if self.model not in ("fast", "reference"):
            raise FastVAEError(f"--model must be 'fast' or 'reference', got {self.model!r}")
        if self.kernel not in ("auto", "triton", "torch"):
            raise FastVAEError(f"--kernel must be auto, triton or torch, got {self.kernel!r}")
        if self.cpu_allocator not in ALLOCATORS:
            raise FastVAEError(f"--cpu-allocator must be {' or '.join(ALLOCATORS)}, got {self.cpu_allocator!r}")
        if not self.dist_timeout > 0:
            raise FastVAEError(f"--dist-timeout must be positive, got {self.dist_timeout}")
