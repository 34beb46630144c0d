"""The lab's VAE, written plainly: the ground truth every fast path is tested against.

Readable on purpose, not fast. Parameter names match `fastvae.model.VAE`, so a state dict loads into either.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributions.kl import kl_divergence
from torch.distributions.normal import Normal

from fastvae.config import ModelConfig


class Encoder(nn.Module):
    """Image (B, C, 28, 28) -> (mean, sigma), each (B, Z); the conv output's second half is log sigma."""

    def __init__(self, im_chan: int = 1, output_chan: int = 32, hidden_dim: int = 16) -> None:
        super().__init__()
        self.z_dim = output_chan
        self.disc = nn.Sequential(
            self.make_disc_block(im_chan, hidden_dim),
            self.make_disc_block(hidden_dim, hidden_dim * 2),
            self.make_disc_block(hidden_dim * 2, output_chan * 2, final_layer=True),
        )

    def make_disc_block(
        self, input_channels: int, output_channels: int, kernel_size: int = 4, stride: int = 2,
        final_layer: bool = False,
    ) -> nn.Sequential:
        if not final_layer:
            return nn.Sequential(
                nn.Conv2d(input_channels, output_channels, kernel_size, stride),
                nn.BatchNorm2d(output_channels),
                nn.LeakyReLU(0.2, inplace=True),
            )
        return nn.Sequential(nn.Conv2d(input_channels, output_channels, kernel_size, stride))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        disc_pred = self.disc(image)
        encoding = disc_pred.view(len(disc_pred), -1)
        # The second half is log sigma by convention, for numerical stability.
        return encoding[:, : self.z_dim], encoding[:, self.z_dim :].exp()


class Decoder(nn.Module):
    """Noise (B, Z) -> image (B, C, 28, 28) in [0, 1] (DCGAN generator with a Sigmoid)."""

    def __init__(self, z_dim: int = 32, im_chan: int = 1, hidden_dim: int = 64) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.gen = nn.Sequential(
            self.make_gen_block(z_dim, hidden_dim * 4),
            self.make_gen_block(hidden_dim * 4, hidden_dim * 2, kernel_size=4, stride=1),
            self.make_gen_block(hidden_dim * 2, hidden_dim),
            self.make_gen_block(hidden_dim, im_chan, kernel_size=4, final_layer=True),
        )

    def make_gen_block(
        self, input_channels: int, output_channels: int, kernel_size: int = 3, stride: int = 2,
        final_layer: bool = False,
    ) -> nn.Sequential:
        if not final_layer:
            return nn.Sequential(
                nn.ConvTranspose2d(input_channels, output_channels, kernel_size, stride),
                nn.BatchNorm2d(output_channels),
                nn.ReLU(inplace=True),
            )
        return nn.Sequential(
            nn.ConvTranspose2d(input_channels, output_channels, kernel_size, stride),
            nn.Sigmoid(),
        )

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        x = noise.view(len(noise), self.z_dim, 1, 1)
        return self.gen(x)


class VAE(nn.Module):
    """The lab's VAE: forward(images) -> (reconstruction in [0, 1], q(z|x) as a Normal)."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.z_dim = config.z_dim
        self.encode = Encoder(config.im_chan, config.z_dim, config.encoder_hidden)
        self.decode = Decoder(config.z_dim, config.im_chan, config.decoder_hidden)

    def forward(
        self, images: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Normal]:
        """`eps` (B, Z), when given, replaces rsample's own draw so fast paths can be compared exactly."""
        q_mean, q_stddev = self.encode(images)
        q_dist = Normal(q_mean, q_stddev)
        z_sample = q_dist.rsample() if eps is None else q_mean + q_stddev * eps
        decoding = self.decode(z_sample)
        return decoding, q_dist


def kl_divergence_loss(q_dist: Normal) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image, (B,)."""
    prior = Normal(torch.zeros_like(q_dist.mean), torch.ones_like(q_dist.stddev))
    return kl_divergence(q_dist, prior).sum(-1)


def loss(recon: torch.Tensor, images: torch.Tensor, q_dist: Normal, beta: float = 1.0) -> torch.Tensor:
    """The lab's loss for a batch: BCE summed over pixels and images + beta * KL summed over images."""
    reconstruction = nn.BCELoss(reduction="sum")(recon, images)
    return reconstruction + beta * kl_divergence_loss(q_dist).sum()
