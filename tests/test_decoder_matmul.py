"""`DecoderAsMatmuls` (the export-time decoder as matrix products) computes the eval-mode decoder's function."""

from __future__ import annotations

import pytest
import torch

from fastvae.config import ModelConfig
from fastvae.export.decoder_matmul import DecoderAsMatmuls
from fastvae.model import VAE
from tests.helpers import TOLERANCES, relative_error


def _trained_looking(config: ModelConfig) -> VAE:
    """An eval-mode VAE whose BatchNorms are not the identity, so that folding them is exercised."""
    model = VAE(config).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


# (1, 1): the default image channels; 3 channels take the batched-matmul path of the last layer.
@pytest.mark.parametrize("config", [ModelConfig(), ModelConfig(z_dim=12, im_chan=3, decoder_hidden=8)], ids=str)
@pytest.mark.parametrize("batch", [1, 5])
def test_equals_the_decoder_in_float64(config: ModelConfig, batch: int) -> None:
    model = _trained_looking(config)
    z = torch.randn(batch, config.z_dim, dtype=torch.float64)
    with torch.no_grad():
        expected = model.decode(z)
        actual = DecoderAsMatmuls(model.decode)(z)
    assert actual.shape == expected.shape == (batch, config.im_chan, config.image_size, config.image_size)
    assert relative_error(actual, expected) < TOLERANCES[torch.float64]


def test_equals_the_decoder_in_float32() -> None:
    """fp32 rounding: the Winograd transforms add some (see fastvae.winograd); the whole stays within fp32's bound."""
    model = _trained_looking(ModelConfig())
    fast = DecoderAsMatmuls(model.float().decode)
    z = torch.randn(64, 32)
    with torch.no_grad():
        expected = model.double().decode(z.double())
        actual = fast(z)
    assert relative_error(actual.double(), expected) < TOLERANCES[torch.float32]


def test_every_tap_lands_once() -> None:
    """Each (tap, input pixel) product lands on exactly one output pixel: every column of each hidden layer's
    overlap matrices holds one 1, each hidden layer lists every output pixel once, and the output layer gathers
    each of its rows once (its padding and bias rows aside), with the bias row once per output."""
    decoder = DecoderAsMatmuls(VAE().eval().decode)
    overlaps = [buffer for layer in decoder.layers for name, buffer in layer.named_buffers()
                if name.startswith("overlap")]
    # The stride-1 layer runs as Winograd, without one. Stride 2, kernel 3: four phases, and the one with a single
    # tap needs no overlap-add.
    assert len(overlaps) == 3
    for layer, size in zip(decoder.layers, (6, 13), strict=True):
        assert sorted(layer.out_pixels) == [(i, j) for i in range(size) for j in range(size)]
    for overlap in overlaps:
        assert overlap.dtype == torch.bool and torch.equal(overlap.sum(0), torch.ones(overlap.shape[1]).long())
    output = decoder.output
    taps, pixels = output.weight.shape[0] - 2, 13 * 13  # the last layer's input is 13x13
    rows = output.rows.flatten()
    products = rows[rows < taps * pixels]
    assert torch.equal(products.sort().values, torch.arange(taps * pixels))
    bias_rows = (rows >= (taps + 1) * pixels).sum().item()
    assert bias_rows == output.rows.shape[1] == 28 * 28
