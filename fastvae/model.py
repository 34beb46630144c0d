"""The fast VAE: the lab's function with a logits decoder, the fused reparameterize+KL op, and a choice of layers.
Parameter names and shapes equal `fastvae.reference.VAE`'s, so one state dict loads into every variant."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvae.config import ModelConfig
from fastvae.conv_as_matmul import conv2d_as_matmul, conv_transpose2d_as_matmul
from fastvae.kernels import load_triton_kernels, reparameterize_kl, reparameterize_kl_sampled
from fastvae.winograd import conv_transpose2d_winograd

# "matmul" (the CPU's): the decoder's first layer is a matrix product, its stride-1 layer runs by Winograd
# (fastvae.winograd), its last two layers and the encoder's last one as one matmul per pass (fastvae.conv_as_matmul).
# "library": PyTorch's own Conv2d and ConvTranspose2d (cuDNN on a GPU). Activations are channels_last in both.
LAYERS = ("matmul", "library")
KERNELS = ("torch", "triton")


def _conv_block(cin: int, cout: int, *, final: bool) -> nn.Sequential:
    if final:
        return nn.Sequential(nn.Conv2d(cin, cout, 4, 2))
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


def _deconv_block(cin: int, cout: int, kernel_size: int, stride: int, *, final: bool) -> nn.Sequential:
    if final:
        # No Sigmoid: the decoder returns logits, so the loss can use BCE-with-logits (autocast-safe).
        return nn.Sequential(nn.ConvTranspose2d(cin, cout, kernel_size, stride))
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, kernel_size, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Encoder(nn.Module):
    """Images (B, C, 28, 28) -> mean (B, Z), log_sigma (B, Z)."""

    def __init__(self, config: ModelConfig, layers: str = "matmul") -> None:
        super().__init__()
        self.z_dim, self.layers = config.z_dim, layers
        hidden = config.encoder_hidden
        self.disc = nn.Sequential(
            _conv_block(config.im_chan, hidden, final=False),
            _conv_block(hidden, hidden * 2, final=False),
            _conv_block(hidden * 2, config.z_dim * 2, final=True),
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.disc[1](self.disc[0](images))
        last = self.disc[2][0]
        # (B, 2Z); flatten keeps the batch dim dynamic at export
        encoding = (conv2d_as_matmul(x, last) if self.layers == "matmul" else last(x)).flatten(1)
        return encoding[:, : self.z_dim], encoding[:, self.z_dim :]


class Decoder(nn.Module):
    """Latents (B, Z) -> logits (B, C, 28, 28); images are sigmoid(logits)."""

    def __init__(self, config: ModelConfig, layers: str = "matmul") -> None:
        super().__init__()
        self.z_dim, self.layers = config.z_dim, layers
        hidden = config.decoder_hidden
        self.gen = nn.Sequential(
            _deconv_block(config.z_dim, hidden * 4, 3, 2, final=False),
            _deconv_block(hidden * 4, hidden * 2, 4, 1, final=False),
            _deconv_block(hidden * 2, hidden, 3, 2, final=False),
            _deconv_block(hidden, config.im_chan, 4, 2, final=True),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.layers == "library":
            x = z.view(-1, self.z_dim, 1, 1).contiguous(memory_format=torch.channels_last)
            return self.gen(x)
        first = self.gen[0][0]
        # A transposed conv on a 1x1 input is a matrix product: (B, Z) @ (Z, 256*3*3).
        x = (z @ first.weight.flatten(1)).view(-1, *first.weight.shape[1:]) + first.bias.view(1, -1, 1, 1)
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.gen[0][2](self.gen[0][1](x))
        for block in self.gen[1:]:
            # NOTE: 2-core Xeon, batch 1024: the training step took 229 ms with the stride-1 layer by Winograd,
            # 288 ms with it as one matmul plus a scatter.
            conv = conv_transpose2d_winograd if block[0].stride[0] == 1 else conv_transpose2d_as_matmul
            x = block[1:](conv(x, block[0]))
        return x


class VAE(nn.Module):
    """forward(images, eps=None, seed_offset=None) -> (logits, mean, log_sigma, kl): logits (B, C, 28, 28), mean
    and log_sigma (B, Z), kl (B,) fp32. Noise: `eps` (B, Z) standard normal, or `seed_offset` (int64
    [seed, offset]) that the `kernel` draws eps from (Philox inside the Triton kernel; counter_normal in the
    PyTorch formula), or neither (torch.randn). `layers` and `kernel` are the run plan's (fastvae.plan)."""

    def __init__(self, config: ModelConfig = ModelConfig(), layers: str = "matmul", kernel: str = "torch") -> None:
        super().__init__()
        if layers not in LAYERS or kernel not in KERNELS:
            raise ValueError(f"layers must be one of {LAYERS} and kernel one of {KERNELS}, got {layers}, {kernel}")
        if kernel == "triton":
            load_triton_kernels()
        self.config, self.layers, self.kernel = config, layers, kernel
        self.z_dim = config.z_dim
        self.encode = Encoder(config, layers)
        self.decode = Decoder(config, layers)

    def reparameterize(
        self, mean: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor | None = None,
        seed_offset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if seed_offset is not None:
            return reparameterize_kl_sampled(mean, log_sigma, seed_offset, self.kernel)
        if eps is None:
            eps = torch.randn(mean.shape, device=mean.device)
        return reparameterize_kl(mean, log_sigma, eps, self.kernel)

    def forward(
        self, images: torch.Tensor, eps: torch.Tensor | None = None, seed_offset: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_sigma = self.encode(images.contiguous(memory_format=torch.channels_last))
        z, kl = self.reparameterize(mean, log_sigma, eps, seed_offset)
        return self.decode(z), mean, log_sigma, kl


def vae_loss(logits: torch.Tensor, images: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Negative ELBO summed over the batch: BCE-with-logits (sum) + beta * KL (sum), in fp32."""
    reconstruction = F.binary_cross_entropy_with_logits(logits.float(), images.float(), reduction="sum")
    return reconstruction + beta * kl.sum()
