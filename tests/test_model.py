"""The fast model computes the reference's function: same loss and gradients on the same parameters and eps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from fastvae import reference
from fastvae.config import ModelConfig
from fastvae.errors import FastVAEError
from fastvae.model import LAYERS, VAE, vae_loss
from tests.helpers import TOLERANCES, relative_error


def _bias_before_batchnorm(model: torch.nn.Module) -> set[str]:
    """Names of conv biases followed by BatchNorm: their true gradient is 0 (BN subtracts the batch mean)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential) and len(module) > 1:
            if isinstance(module[1], torch.nn.BatchNorm2d):
                names.add(f"{name}.0.bias")
    return names


@contextmanager
def _kink_sides(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record, for every (Leaky)ReLU input element of a forward pass, which side of the kink at 0 it is on."""
    sides: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: sides.append(args[0].detach() > 0))
             for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU))]
    try:
        yield sides
    finally:
        for hook in hooks:
            hook.remove()


def _inputs_off_kinks(ref: torch.nn.Module, fast: torch.nn.Module, batch: int, im_chan: int,
                      z_dim: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh images and eps on which both models put every ReLU input on the same side of 0.

    ReLU's gradient jumps at 0. An element within fp32 rounding of 0 can land on either side in two summation
    orders, and the gradients then differ there by O(1): legitimately, for both fp32 paths differ as much from
    the reference in float64 (measured: ~1 draw in 12 at B=64, 3 channels). Such draws are redrawn.
    """
    for _ in range(10):
        images, eps = torch.rand(batch, im_chan, 28, 28), torch.randn(batch, z_dim)
        dtype = next(ref.parameters()).dtype
        # With autograd on, as the forward whose gradients are compared: without it a single image takes the
        # library layers (conv_as_matmul.library_layer_runs), whose rounding puts other elements near 0.
        with _kink_sides(ref) as ref_sides, _kink_sides(fast) as fast_sides:
            ref(images.to(dtype), eps.to(dtype))
            fast(images.to(device), eps.to(device))
        assert len(ref_sides) == len(fast_sides) > 0
        if all(torch.equal(a, b.cpu()) for a, b in zip(ref_sides, fast_sides, strict=True)):
            return images, eps
    pytest.fail("10 draws in a row put a ReLU input on different sides of 0 in the two models")


def _assert_gradients_match(grads: dict[str, torch.nn.Parameter], ref: torch.nn.Module) -> None:
    """Gradients of the fast model (`grads`, fp32) against the reference's (`ref`, float64)."""
    tol = TOLERANCES[torch.float32]
    scale = max(p.grad.abs().max() for p in ref.parameters())
    zero_grad = _bias_before_batchnorm(ref)
    assert zero_grad, "the lab's blocks put BatchNorm after each conv but the last"
    layers: dict[str, list[str]] = {}
    for name in grads:
        if name in zero_grad:
            # Rounding noise around an exact 0 (float64's is far smaller); compare with the model's gradients.
            assert grads[name].grad.abs().max().item() <= tol * scale, name
        else:
            layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    # One relative error per layer (weight and bias together): a bias gradient alone is a sum over the batch
    # and every pixel that can cancel to a small value (the output bias's: sum of sigmoid - x), and then
    # carries the fp32 rounding of its large terms: measured 1e-5 relative in both fp32 paths, vs float64.
    ref_grads = dict(ref.named_parameters())
    for layer, names in layers.items():
        fast_grad = torch.cat([grads[n].grad.flatten() for n in names]).cpu()
        ref_grad = torch.cat([ref_grads[n].grad.flatten() for n in names])
        assert relative_error(fast_grad, ref_grad) <= tol, layer


def _pair(config: ModelConfig = ModelConfig(), layers: str = "matmul", kernel: str = "torch",
          device: str = "cpu") -> tuple[reference.VAE, VAE]:
    """The lab's model on the CPU and the fast one on `device`, with the same weights."""
    ref = reference.VAE(config)
    fast = VAE(config, layers, kernel)
    fast.load_state_dict(ref.state_dict())
    return ref, fast.to(device)


@contextmanager
def _fp32_exact() -> Iterator[None]:
    """fp32 convolutions and matmuls on CUDA without TF32: cuDNN's convolutions use it by default (10 mantissa
    bits, ~1e-3 relative error), which is another dtype's rounding, not fp32's."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


# (device, kernel) of the fast model: every variant that runs here, with the CUDA ones where a GPU is.
DEVICE_KERNELS = [("cpu", "torch"), pytest.param("cuda", "torch", marks=pytest.mark.cuda),
                  pytest.param("cuda", "triton", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device, kernel", DEVICE_KERNELS)
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("batch, z_dim, im_chan, beta", [(1, 32, 1, 1.0), (7, 20, 1, 4.0), (64, 33, 3, 0.5)], ids=str)
def test_loss_and_gradients_match_reference(batch: int, z_dim: int, im_chan: int, beta: float, layers: str,
                                            device: str, kernel: str) -> None:
    """The fast model in fp32 against the lab's model evaluated in float64 on the CPU, the function's exact value.

    Against the lab's model in fp32 the comparison would also measure that model's own rounding: Sigmoid +
    BCELoss loses precision where the sigmoid saturates (log(1 - s) of a rounded s, clamped at -100), and
    sums that cancel (the output bias's gradient) amplify either side's rounding.
    """
    config = ModelConfig(z_dim=z_dim, im_chan=im_chan)
    ref, fast = _pair(config, layers, kernel, device)
    ref = ref.double()
    with _fp32_exact():
        images, eps = _inputs_off_kinks(ref, fast, batch, im_chan, z_dim, device)
        recon, q_dist = ref(images.double(), eps.double())
        ref_loss = reference.loss(recon, images.double(), q_dist, beta)
        logits, mean, log_sigma, kl = (t.cpu() for t in fast(images.to(device), eps.to(device)))
        fast_loss = vae_loss(logits, images, kl, beta)
        ref_loss.backward()
        fast_loss.backward()

    tol = TOLERANCES[torch.float32]
    assert relative_error(fast_loss, ref_loss) <= tol
    assert relative_error(torch.sigmoid(logits), recon) <= tol
    assert relative_error(mean, q_dist.mean) <= tol
    assert relative_error(log_sigma.exp(), q_dist.stddev) <= tol
    _assert_gradients_match(dict(fast.named_parameters()), ref)


def test_state_dict_moves_both_ways() -> None:
    ref, fast = _pair()
    assert set(ref.state_dict()) == set(fast.state_dict()) == set(VAE(layers="library").state_dict())
    back = reference.VAE()
    back.load_state_dict(fast.state_dict())
    for name, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("batch", [1, 5], ids=str)  # batch 1 without grad takes oneDNN's ConvTranspose
def test_eval_mode_matches_reference(batch: int, layers: str) -> None:
    ref, fast = _pair(layers=layers)
    for _ in range(2):  # move BatchNorm's running statistics away from their initial values
        ref(torch.rand(16, 1, 28, 28))
    fast.load_state_dict(ref.state_dict())
    ref.eval()
    fast.eval()
    images, eps = torch.rand(batch, 1, 28, 28), torch.randn(batch, 32)
    with torch.no_grad():
        recon, _ = ref(images, eps)
        logits = fast(images, eps)[0]
    assert relative_error(torch.sigmoid(logits), recon) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("device, kernel", DEVICE_KERNELS)
@pytest.mark.parametrize("layers", LAYERS)
def test_bf16_autocast_loss_close_to_reference(layers: str, device: str, kernel: str) -> None:
    ref, fast = _pair(layers=layers, kernel=kernel, device=device)
    images, eps = torch.rand(16, 1, 28, 28), torch.randn(16, 32)
    recon, q_dist = ref(images, eps)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits, _, _, kl = fast(images.to(device), eps.to(device))
    assert logits.dtype == torch.bfloat16 and kl.dtype == torch.float32
    loss = vae_loss(logits, images.to(device), kl)
    assert loss.dtype == torch.float32
    assert relative_error(loss.cpu(), reference.loss(recon, images, q_dist)) <= TOLERANCES[torch.bfloat16]


# The CPU's default (matmul layers, PyTorch formula) and the GPU's (library layers, Triton kernel).
COMPILED_VARIANTS = [("cpu", "matmul", "torch"), pytest.param("cuda", "library", "triton", marks=pytest.mark.cuda)]


@pytest.mark.slow
@pytest.mark.parametrize("device, layers, kernel", COMPILED_VARIANTS)
def test_compiled_loss_and_gradients_match_reference(device: str, layers: str, kernel: str) -> None:
    ref, fast = _pair(layers=layers, kernel=kernel, device=device)
    ref = ref.double()
    with _fp32_exact():
        # NOTE: inductor's fused kernels round differently from eager, so a ReLU input within rounding of 0 could
        # still flip in the compiled graph; at B=4 (43k such inputs) the odds are ~0.3% a run.
        images, eps = _inputs_off_kinks(ref, fast, 4, 1, 32, device)

        def loss_fn(images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            logits, _, _, kl = fast(images, eps)
            return vae_loss(logits, images, kl)

        compiled_loss = torch.compile(loss_fn, fullgraph=True)(images.to(device), eps.to(device))
        compiled_loss.backward()
        recon, q_dist = ref(images.double(), eps.double())
        ref_loss = reference.loss(recon, images.double(), q_dist)
        ref_loss.backward()
    assert relative_error(compiled_loss.cpu(), ref_loss) <= TOLERANCES[torch.float32]
    _assert_gradients_match(dict(fast.named_parameters()), ref)


def test_other_image_sizes_fail_clearly() -> None:
    with pytest.raises(FastVAEError, match="28x28"):
        ModelConfig(image_size=32)
