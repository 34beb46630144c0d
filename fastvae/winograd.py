"""The decoder's stride-1 transposed convolution by Toom-Cook (Winograd) minimal filtering, for training and export."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.library import custom_op

from fastvae.conv_as_matmul import bias_grad_dtype, conv_transpose2d_as_matmul, fake_grads, library_layer_runs

# Evaluation points (None: infinity) for the 6-point transform: among sets of small fractions, one of the lowest
# fp32 errors that are exact in binary.
# NOTE: against float64 on random weights, the layer's largest error was 2.6e-6 of its largest output (direct sum:
# 1.8e-7; points 0, +-1, +-2, infinity: 4.4e-6), the gradients' of the same order: within fp32's 1e-5. In float64
# the layer equals the convolution to 1e-13.
WINOGRAD_POINTS = (0.0, -1.0, -2.0, 0.5, 1.5, None)


def toom_cook(size_in: int, kernel: int, points: tuple[float | None, ...]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (n, size_in), G (n, kernel), V_inv (n, n)) in float64, n = size_in + kernel - 1 = len(points): the full
    linear convolution of a (size_in,) and w (kernel,) is V_inv @ ((A @ a) * (G @ w)). A and G evaluate the two
    polynomials at the points (at infinity, their leading coefficients), V_inv interpolates the product's."""
    def evaluate(terms: int) -> torch.Tensor:
        return torch.tensor([[0.0] * (terms - 1) + [1.0] if point is None else [point**e for e in range(terms)]
                             for point in points], dtype=torch.float64)

    if size_in + kernel - 1 != len(points):
        raise ValueError(f"{len(points)} points cannot convolve {size_in} values with a kernel of {kernel}")
    return evaluate(size_in), evaluate(kernel), torch.linalg.inv(evaluate(size_in + kernel - 1))


def transforms_2d(size_in: int, kernel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T_in (n^2, size_in^2), G (n^2, kernel^2), T_out (size_out^2, n^2)) in float64 for square images with pixels
    in row-major order: each 2D transform is the Kronecker product of the two axes' 1D ones."""
    return tuple(torch.kron(m, m) for m in toom_cook(size_in, kernel, WINOGRAD_POINTS))


@functools.lru_cache
def _transforms(size_in: int, kernel: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(m.to(dtype=dtype, device=device) for m in transforms_2d(size_in, kernel))


def point_weights(weight: torch.Tensor, evaluate_kernel: torch.Tensor) -> torch.Tensor:
    """(Cin, Cout, k, k) -> (n^2, Cin, Cout): the weights at each point."""
    cin, cout, kernel, _ = weight.shape
    return (evaluate_kernel @ weight.permute(2, 3, 0, 1).reshape(kernel * kernel, cin * cout)).view(-1, cin, cout)


def _pixel_major(image: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (H * W, B * C): one row per pixel, so a transform is one matmul over the whole batch."""
    batch, channels, height, width = image.shape
    return image.permute(2, 3, 0, 1).reshape(height * width, batch * channels)


def _channels_last(pixels: torch.Tensor, batch: int, side: int) -> torch.Tensor:
    """(side * side, B * C) -> (B, C, side, side), channels_last."""
    return pixels.view(side, side, batch, -1).permute(2, 0, 1, 3).contiguous().permute(0, 3, 1, 2)


# With stride 1, ConvTranspose2d is a full 2D linear convolution of each input channel with each kernel slice. Both
# are evaluated at n points per axis (n = input side + kernel - 1), which turns the layer into n^2 independent channel
# products: points = T_in @ x over the input pixels, one (batch, Cin) x (Cin, Cout) matmul per point with the weights
# transformed (G W G^T), and out = T_out @ products over the points, which interpolates the output pixels. For the
# lab's 3x3 -> 6x6 layer with a 4x4 kernel that is 36 products per image instead of 144, with no overlap-add.
@custom_op("fastvae::conv_transpose2d_winograd", mutates_args=())
def _conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    batch, cin, side, _ = x.shape
    kernel = weight.shape[2]
    points_in, evaluate_kernel, points_out = _transforms(side, kernel, x.dtype, x.device)
    points = (points_in @ _pixel_major(x)).view(-1, batch, cin)
    products = torch.bmm(points, point_weights(weight, evaluate_kernel)).view(len(points), -1)
    out = torch.addmm(bias.to(x.dtype).repeat(batch)[None], points_out, products)  # (P_out, B * Cout)
    return _channels_last(out, batch, side + kernel - 1)


@_conv_transpose2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    side = x.shape[2] + weight.shape[2] - 1
    return x.new_empty(x.shape[0], side, side, weight.shape[1]).permute(0, 3, 1, 2)


# The forward's three steps, transposed.
@custom_op("fastvae::conv_transpose2d_winograd_backward", mutates_args=())
def _conv_transpose2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, cin, side, _ = x.shape
    _, cout, kernel, _ = weight.shape
    points_in, evaluate_kernel, points_out = _transforms(side, kernel, x.dtype, x.device)
    # Recomputed rather than saved: n^2 / P_in = 4x the input's memory, for one small matmul.
    points = (points_in @ _pixel_major(x)).view(-1, batch, cin)
    grad_pixels = _pixel_major(grad.to(x.dtype))  # (P_out, B * Cout)
    grad_products = (points_out.t() @ grad_pixels).view(-1, batch, cout)
    grad_points = torch.bmm(grad_products, point_weights(weight, evaluate_kernel).transpose(1, 2))
    grad_x = _channels_last(points_in.t() @ grad_points.view(len(grad_points), -1), batch, side)
    grad_point_weights = torch.bmm(points.transpose(1, 2), grad_products).view(len(points), -1)
    grad_weight = (evaluate_kernel.t() @ grad_point_weights).view(kernel, kernel, cin, cout).permute(2, 3, 0, 1)
    grad_bias = grad_pixels.reshape(-1, cout).sum(0, dtype=bias_grad_dtype(x))
    return grad_x, grad_weight.contiguous(), grad_bias


@_conv_transpose2d_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return fake_grads(x, weight, out_channels=weight.shape[1])


def _save_for_backward(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = bias.dtype


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    grad_x, grad_weight, grad_bias = _conv_transpose2d_backward(grad, *ctx.saved_tensors)
    return grad_x, grad_weight, grad_bias.to(ctx.bias_dtype)


_conv_transpose2d.register_autograd(_backward, setup_context=_save_for_backward)


def conv_transpose2d_winograd(x: torch.Tensor, layer: nn.ConvTranspose2d) -> torch.Tensor:
    """`layer(x)` for a stride-1 layer and x (B, Ci, H, W), by Winograd; the result is channels_last.

    Hands over to `conv_transpose2d_as_matmul` under autocast and for other dtypes than fp32/fp64 (the transforms
    would amplify bf16's rounding), and to the layer itself where `library_layer_runs`.
    """
    if layer.stride[0] != 1:
        raise ValueError(f"Winograd here computes stride-1 transposed convolutions, got stride {layer.stride[0]}")
    low_precision = torch.is_autocast_enabled(x.device.type) or x.dtype not in (torch.float32, torch.float64)
    if library_layer_runs(x):
        return layer(x)
    if low_precision:
        return conv_transpose2d_as_matmul(x, layer)
    return _conv_transpose2d(x, layer.weight, layer.bias)
