"""The fast model computes the reference's function: same loss and gradients on the same parameters and eps."""

from __future__ import annotations

import pytest
import torch

from fastvae import reference
from fastvae.config import ModelConfig
from fastvae.errors import FastVAEError
from fastvae.model import VAE, vae_loss
from tests.conftest import TOLERANCES, relative_error


def _bias_before_batchnorm(model: torch.nn.Module) -> set[str]:
    """Names of conv biases followed by BatchNorm: their true gradient is 0 (BN subtracts the batch mean)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential) and len(module) > 1:
            if isinstance(module[1], torch.nn.BatchNorm2d):
                names.add(f"{name}.0.bias")
    return names


def _pair(config: ModelConfig = ModelConfig()) -> tuple[reference.VAE, VAE]:
    ref = reference.VAE(config)
    fast = VAE(config)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("batch, z_dim, im_chan, beta", [(1, 32, 1, 1.0), (7, 20, 1, 4.0), (64, 33, 3, 0.5)], ids=str)
def test_loss_and_gradients_match_reference(batch: int, z_dim: int, im_chan: int, beta: float) -> None:
    config = ModelConfig(z_dim=z_dim, im_chan=im_chan)
    ref, fast = _pair(config)
    images = torch.rand(batch, im_chan, 28, 28)
    eps = torch.randn(batch, z_dim)

    recon, q_dist = ref(images, eps)
    ref_loss = reference.loss(recon, images, q_dist, beta)
    logits, mean, log_sigma, kl = fast(images, eps)
    fast_loss = vae_loss(logits, images, kl, beta)
    ref_loss.backward()
    fast_loss.backward()

    tol = TOLERANCES[torch.float32]
    assert relative_error(fast_loss, ref_loss) <= tol
    assert relative_error(torch.sigmoid(logits), recon) <= tol
    assert relative_error(mean, q_dist.mean) <= tol
    assert relative_error(log_sigma.exp(), q_dist.stddev) <= tol
    grads = dict(fast.named_parameters())
    scale = max(p.grad.abs().max() for p in ref.parameters())
    zero_grad = _bias_before_batchnorm(ref)
    assert zero_grad, "the lab's blocks put BatchNorm after each conv but the last"
    for name, p in ref.named_parameters():
        if name in zero_grad:
            # Both are rounding noise around an exact 0; compare their size with the model's gradients.
            assert p.grad.abs().max() <= tol * scale and grads[name].grad.abs().max() <= tol * scale, name
        else:
            assert relative_error(grads[name].grad, p.grad) <= tol, name


def test_state_dict_moves_both_ways() -> None:
    ref, fast = _pair()
    assert set(ref.state_dict()) == set(fast.state_dict())
    back = reference.VAE()
    back.load_state_dict(fast.state_dict())
    for name, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_eval_mode_matches_reference() -> None:
    ref, fast = _pair()
    for _ in range(2):  # move BatchNorm's running statistics away from their initial values
        ref(torch.rand(16, 1, 28, 28))
    fast.load_state_dict(ref.state_dict())
    ref.eval()
    fast.eval()
    images, eps = torch.rand(5, 1, 28, 28), torch.randn(5, 32)
    with torch.no_grad():
        recon, _ = ref(images, eps)
        logits = fast(images, eps)[0]
    assert relative_error(torch.sigmoid(logits), recon) <= TOLERANCES[torch.float32]


def test_bf16_autocast_loss_close_to_reference() -> None:
    ref, fast = _pair()
    images, eps = torch.rand(16, 1, 28, 28), torch.randn(16, 32)
    recon, q_dist = ref(images, eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, _, kl = fast(images, eps)
    assert logits.dtype == torch.bfloat16
    loss = vae_loss(logits, images, kl)
    assert loss.dtype == torch.float32
    assert relative_error(loss, reference.loss(recon, images, q_dist)) <= TOLERANCES[torch.bfloat16]


def test_compiled_loss_and_gradients_match_eager() -> None:
    ref, fast = _pair()
    images, eps = torch.rand(4, 1, 28, 28), torch.randn(4, 32)

    def loss_fn(images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        logits, _, _, kl = fast(images, eps)
        return vae_loss(logits, images, kl)

    compiled_loss = torch.compile(loss_fn, fullgraph=True)(images, eps)
    compiled_loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in fast.named_parameters()}
    recon, q_dist = ref(images, eps)
    ref_loss = reference.loss(recon, images, q_dist)
    ref_loss.backward()
    tol = TOLERANCES[torch.float32]
    assert relative_error(compiled_loss, ref_loss) <= tol
    zero_grad = _bias_before_batchnorm(ref)
    for name, p in ref.named_parameters():
        if name not in zero_grad:
            assert relative_error(compiled_grads[name], p.grad) <= tol, name


def test_other_image_sizes_fail_clearly() -> None:
    with pytest.raises(FastVAEError, match="28x28"):
        ModelConfig(image_size=32)
