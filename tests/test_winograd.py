"""Winograd (Toom-Cook) for the stride-1 transposed convolution: the transforms, and the training op against
PyTorch's layer, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastvae.winograd import WINOGRAD_POINTS, conv_transpose2d_winograd, toom_cook
from tests.helpers import TOLERANCES, relative_error


@pytest.mark.parametrize("size_in, kernel", [(3, 4), (2, 5), (4, 3)])
def test_toom_cook_computes_the_full_convolution(size_in: int, kernel: int) -> None:
    evaluate_in, evaluate_kernel, interpolate = toom_cook(size_in, kernel, WINOGRAD_POINTS)
    a, w = torch.randn(size_in, dtype=torch.float64), torch.randn(kernel, dtype=torch.float64)
    expected = torch.nn.functional.conv_transpose1d(a.view(1, 1, -1), w.view(1, 1, -1)).flatten()
    torch.testing.assert_close(interpolate @ ((evaluate_in @ a) * (evaluate_kernel @ w)), expected,
                               rtol=1e-12, atol=1e-12)


def test_toom_cook_needs_one_point_per_output() -> None:
    with pytest.raises(ValueError, match="6 points cannot convolve 3 values with a kernel of 3"):
        toom_cook(3, 3, WINOGRAD_POINTS)


def _forward_and_grads(layer: nn.ConvTranspose2d, x: torch.Tensor, grad: torch.Tensor, fn) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_(True)
    out = fn(x)
    return (out, *torch.autograd.grad(out, (x, layer.weight, layer.bias), grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_matches_pytorch(dtype: torch.dtype, channels_last: bool) -> None:
    """The model's stride-1 layer (256 -> 128 channels, 4x4 kernel, 3x3 input): output and all three gradients
    against PyTorch's layer in float64, to the dtype's tolerance."""
    layer = nn.ConvTranspose2d(256, 128, 4, 1).to(dtype)
    x = torch.randn(5, 256, 3, 3, dtype=dtype).relu()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(5, 128, 6, 6, dtype=dtype)
    got = _forward_and_grads(layer, x, grad, lambda x: conv_transpose2d_winograd(x, layer))
    exact = layer.double()
    want = _forward_and_grads(exact, x.double(), grad.double(), exact)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, g, w in zip(("output", "d input", "d weight", "d bias"), got, want, strict=True):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert relative_error(g, w) <= TOLERANCES[dtype], name


def test_gradcheck_and_opcheck() -> None:
    """Gradients against finite differences in float64, and the ops' registration (schema, fake, autograd), on a
    small layer whose sizes the 6 points also fit: a 4x4 input and a 3x3 kernel."""
    layer = nn.ConvTranspose2d(3, 5, 3, 1).double()
    args = (torch.randn(2, 3, 4, 4, dtype=torch.float64).requires_grad_(True), layer.weight, layer.bias)
    op = torch.ops.fastvae.conv_transpose2d_winograd
    assert torch.autograd.gradcheck(lambda x, weight, bias: op(x, weight, bias), args)
    torch.library.opcheck(op, args)


def test_autocast_and_other_strides() -> None:
    """Under autocast the layer runs in bf16 through the direct matmul form; a strided layer is refused."""
    layer = nn.ConvTranspose2d(256, 128, 4, 1)
    x = torch.randn(4, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_transpose2d_winograd(x, layer)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, layer.double()(x.double())) <= TOLERANCES[torch.bfloat16]
    with pytest.raises(ValueError, match="stride 2"):
        conv_transpose2d_winograd(x, nn.ConvTranspose2d(256, 128, 3, 2))
