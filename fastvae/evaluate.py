"""Test-set bounds in nats per image: the negative ELBO and the importance-weighted (IWAE) bound."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvae.data import ordered_batches
from fastvae.model import VAE, vae_loss


@torch.no_grad()
def negative_elbo(
    model: VAE, images: torch.Tensor, generator: torch.Generator, batch_size: int = 1024
) -> float:
    """Mean over `images` (uint8, N x C x H x W) of BCE(sum over pixels) + KL, one z sample per image."""
    was_training = model.training
    model.eval()
    total = 0.0
    for batch in ordered_batches(images, batch_size):
        eps = torch.randn((len(batch), model.z_dim), generator=generator, device=batch.device)
        logits, _, _, kl = model(batch, eps)
        total += vae_loss(logits, batch, kl).item()
    model.train(was_training)
    return total / len(images)


@torch.no_grad()
def importance_weighted_bound(
    model: VAE, images: torch.Tensor, k: int, generator: torch.Generator, max_batch: int = 4096
) -> float:
    """-log p(x) bound of Burda et al. (2016) with k samples, mean over `images`, in nats per image.

    log w = log p(x|z) + log p(z) - log q(z|x); the bound is -(logsumexp_k log w - log k). Samples are
    decoded in chunks of at most `max_batch` images so memory stays bounded for any k.
    """
    was_training = model.training
    model.eval()
    images_per_chunk = max(1, max_batch // k)
    samples_per_chunk = min(k, max_batch)
    total = 0.0
    for x in ordered_batches(images, images_per_chunk):
        mean, log_sigma = (t.float() for t in model.encode(x))  # (b, Z)
        target = x.flatten(1)  # (b, C*H*W)
        running = torch.full((len(x),), -math.inf, device=x.device)
        for start in range(0, k, samples_per_chunk):
            n = min(samples_per_chunk, k - start)
            eps = torch.randn((n, *mean.shape), generator=generator, device=x.device)  # (n, b, Z)
            z = mean + log_sigma.exp() * eps
            # reshape, not view: a colour decoder's output is channels_last, which (C, H, W) order cannot view
            logits = model.decode(z.flatten(0, 1)).float().reshape(n, len(x), -1)
            log_px = -F.binary_cross_entropy_with_logits(
                logits, target.expand_as(logits), reduction="none"
            ).sum(-1)  # (n, b)
            # log p(z) - log q(z|x); the 2*pi terms cancel.
            log_ratio = (-0.5 * z * z + 0.5 * eps * eps + log_sigma).sum(-1)  # (n, b)
            running = torch.logaddexp(running, torch.logsumexp(log_px + log_ratio, 0))
        total += -(running - math.log(k)).sum().item()
    model.train(was_training)
    return total / len(images)
