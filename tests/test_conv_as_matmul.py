"""The matmul-form convolutions equal PyTorch's own, forward and backward, at the model's layer shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fastvae.conv_as_matmul import conv2d_as_matmul, conv_transpose2d_as_matmul
from tests.helpers import TOLERANCES, relative_error

# (layer class, in channels, out channels, kernel, stride, input side): the model's layers and an odd one.
LAYERS = [
    (nn.Conv2d, 32, 64, 4, 2, 5),  # encoder's last layer
    (nn.Conv2d, 3, 5, 3, 2, 9),
    (nn.ConvTranspose2d, 256, 128, 4, 1, 3),  # decoder layers 2-4
    (nn.ConvTranspose2d, 128, 64, 3, 2, 6),
    (nn.ConvTranspose2d, 64, 1, 4, 2, 13),
    (nn.ConvTranspose2d, 3, 5, 2, 3, 4),  # stride above kernel: patches do not overlap
]
MATMUL_FORM = {nn.Conv2d: conv2d_as_matmul, nn.ConvTranspose2d: conv_transpose2d_as_matmul}
OPS = {nn.Conv2d: torch.ops.fastvae.conv2d_as_matmul, nn.ConvTranspose2d: torch.ops.fastvae.conv_transpose2d_as_matmul}


def _layer_and_input(spec: tuple, batch: int, channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
    cls, cin, cout, kernel, stride, side = spec
    layer = cls(cin, cout, kernel, stride)
    x = torch.randn(batch, cin, side, side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return layer, x


def _forward_and_grads(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, fn) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_(True)
    out = fn(x)
    dx, dw, db = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad)
    return out, dx, dw, db


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("spec", LAYERS, ids=lambda s: f"{s[0].__name__}-{s[1]}-{s[2]}-k{s[3]}-s{s[4]}-{s[5]}px")
def test_matches_pytorch_in_float64(spec: tuple, channels_last: bool) -> None:
    """fp32 matmul form vs PyTorch's layer in float64: output and all three gradients."""
    layer, x = _layer_and_input(spec, 5, channels_last)
    grad = torch.randn_like(layer(x))
    got = _forward_and_grads(layer, x, grad, lambda x: MATMUL_FORM[type(layer)](x, layer))
    exact = layer.double()
    want = _forward_and_grads(exact, x.double(), grad.double(), exact)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, g, w in zip(("output", "d input", "d weight", "d bias"), got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert relative_error(g, w) <= TOLERANCES[torch.float32], name


@pytest.mark.parametrize("spec", [LAYERS[1], LAYERS[5]], ids=["conv", "conv_transpose"])
def test_gradcheck_and_opcheck(spec: tuple) -> None:
    """Gradients against finite differences in float64, and the ops' registration (schema, fake, autograd)."""
    layer, x = _layer_and_input(spec, 2, True)
    layer = layer.double()
    args = (x.double().requires_grad_(True), layer.weight, layer.bias)
    op = OPS[type(layer)]
    stride = layer.stride[0]
    assert torch.autograd.gradcheck(lambda x, weight, bias: op(x, weight, bias, stride), args)
    torch.library.opcheck(op, (*args, stride))


@pytest.mark.parametrize("spec", [LAYERS[0], LAYERS[3]], ids=["conv", "conv_transpose"])
def test_autocast_computes_in_bf16(spec: tuple) -> None:
    """Under autocast the op runs in bf16 like the library conv, and its gradients come back in fp32."""
    layer, x = _layer_and_input(spec, 4, True)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MATMUL_FORM[type(layer)](x, layer)
        want = layer(x)
    assert out.dtype == want.dtype == torch.bfloat16
    assert relative_error(out, copy.deepcopy(layer).double()(x.detach().double())) <= TOLERANCES[torch.bfloat16]
    out.float().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
