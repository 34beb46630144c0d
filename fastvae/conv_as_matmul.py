"""Convolutions as one matrix product per pass plus a patch gather or scatter, on channels-last activations."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.library import custom_op


def _gather_patches(image: torch.Tensor, kernel: int, stride: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """image (B, H, W, C) contiguous -> (B * Ho * Wo, kernel * kernel * C): every kernel window, as matrix rows."""
    batch, _, _, channels = image.shape
    sb, sh, sw, sc = image.stride()
    windows = image.as_strided((batch, *out_hw, kernel, kernel, channels), (sb, stride * sh, stride * sw, sh, sw, sc))
    return windows.reshape(-1, kernel * kernel * channels)


def _scatter_add_patches(image: torch.Tensor, patches: torch.Tensor, stride: int) -> torch.Tensor:
    """image (B, H, W, C) += every patch of patches (B, h, w, k, k, C) at its window: the gather's adjoint."""
    _, rows, cols, kernel, _, _ = patches.shape
    for kh in range(kernel):
        for kw in range(kernel):
            image[:, kh : kh + stride * (rows - 1) + 1 : stride, kw : kw + stride * (cols - 1) + 1 : stride] += (
                patches[:, :, :, kh, kw]
            )
    return image


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()  # a view when x is channels_last


def _transposed_weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """(Ci, Co, k, k) -> (Ci, k * k * Co): row i is the (k, k, Co) patch one input channel paints."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """(Co, Ci, k, k) -> (k * k * Ci, Co), matching `_gather_patches`' column order."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])


def _conv_transpose_out_hw(x: torch.Tensor, weight: torch.Tensor, stride: int) -> tuple[int, int]:
    kernel = weight.shape[2]
    return (x.shape[2] - 1) * stride + kernel, (x.shape[3] - 1) * stride + kernel


def _conv_out_hw(x: torch.Tensor, weight: torch.Tensor, stride: int) -> tuple[int, int]:
    kernel = weight.shape[2]
    return (x.shape[2] - kernel) // stride + 1, (x.shape[3] - kernel) // stride + 1


def bias_grad_dtype(x: torch.Tensor) -> torch.dtype:
    """The bias gradient's dtype in every backward op here and in fastvae.winograd: it is a sum over the batch
    and the pixels, so at least fp32 (fp64 stays fp64, for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def fake_grads(x: torch.Tensor, weight: torch.Tensor, out_channels: int) -> tuple[torch.Tensor, ...]:
    """What every backward op returns, for the fake kernels: grad x (channels_last), grad weight, grad bias."""
    grad_x = x.new_empty(x.shape[0], *x.shape[2:], x.shape[1]).permute(0, 3, 1, 2)
    return grad_x, torch.empty_like(weight), x.new_empty(out_channels, dtype=bias_grad_dtype(x))


def library_layer_runs(x: torch.Tensor) -> bool:
    """Whether a layer runs as PyTorch's own instead of a custom op (here and in fastvae.winograd): while
    exporting, so the graph keeps ONNX's Conv and ConvTranspose, which onnxruntime runs itself; and for a single
    image without autograd, where a custom op's per-call cost outweighs its gain."""
    # NOTE: batch 1, no grad, 2-core Xeon: the decoder's last two layers took 168 and 166 us as custom ops,
    # 65 and 86 us in oneDNN; from batch 4 up the ops were faster or within 25 us.
    return torch.compiler.is_exporting() or (x.shape[0] == 1 and not torch.is_grad_enabled())


# One large matmul per pass (forward, input gradient, weight gradient), the spatial bookkeeping done as strided
# copies. torch.library custom ops, so torch.compile calls them as they are rather than tracing into them.
# NOTE: 2-core Xeon: oneDNN's convolutions were 78% of a training-step profile, running well below matmul speed
# (fastvae/plan.py), worst in the transposed convolutions' backward; as these ops a layer's forward + backward ran
# 1.2-2x faster. Traced into, the patch loops took 227 s to compile and the step ran at a third of the eager speed.
@custom_op("fastvae::conv_transpose2d_as_matmul", mutates_args=())
def _conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    x_nhwc = _nhwc(x)  # (B, H, W, Ci)
    batch, height, width, in_channels = x_nhwc.shape
    _, out_channels, kernel, _ = weight.shape
    # Each input pixel's output patch, (B, H, W, k, k, Co), summed into place.
    patches = (x_nhwc.view(-1, in_channels) @ _transposed_weight_rows(weight)).view(
        batch, height, width, kernel, kernel, out_channels
    )
    out = bias.to(x.dtype).expand(batch, *_conv_transpose_out_hw(x, weight, stride), out_channels).contiguous()
    return _scatter_add_patches(out, patches, stride).permute(0, 3, 1, 2)


@_conv_transpose2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    out_hw = _conv_transpose_out_hw(x, weight, stride)
    return x.new_empty(x.shape[0], *out_hw, weight.shape[1]).permute(0, 3, 1, 2)


@custom_op("fastvae::conv_transpose2d_as_matmul_backward", mutates_args=())
def _conv_transpose2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_nhwc, grad_nhwc = _nhwc(x), _nhwc(grad.to(x.dtype))  # (B, H, W, Ci), (B, Ho, Wo, Co)
    batch, height, width, in_channels = x_nhwc.shape
    kernel = weight.shape[2]
    # The output gradient's windows, gathered once, feed both the input and the weight gradient.
    grad_rows = _gather_patches(grad_nhwc, kernel, stride, (height, width))  # (B*H*W, k*k*Co)
    grad_x = (grad_rows @ _transposed_weight_rows(weight).t()).view(batch, height, width, in_channels)
    grad_weight = (x_nhwc.view(-1, in_channels).t() @ grad_rows).view(in_channels, kernel, kernel, -1)
    grad_bias = grad_nhwc.sum((0, 1, 2), dtype=bias_grad_dtype(x))
    return grad_x.permute(0, 3, 1, 2), grad_weight.permute(0, 3, 1, 2).contiguous(), grad_bias


@_conv_transpose2d_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int) -> tuple[torch.Tensor, ...]:
    return fake_grads(x, weight, out_channels=weight.shape[1])


@custom_op("fastvae::conv2d_as_matmul", mutates_args=())
def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    x_nhwc = _nhwc(x)
    out_hw = _conv_out_hw(x, weight, stride)
    windows = _gather_patches(x_nhwc, weight.shape[2], stride, out_hw)  # (B*Ho*Wo, k*k*Ci)
    out = torch.addmm(bias.to(x.dtype), windows, _weight_rows(weight))
    return out.view(x.shape[0], *out_hw, -1).permute(0, 3, 1, 2)


@_conv2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], *_conv_out_hw(x, weight, stride), weight.shape[0]).permute(0, 3, 1, 2)


@custom_op("fastvae::conv2d_as_matmul_backward", mutates_args=())
def _conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_nhwc, grad_nhwc = _nhwc(x), _nhwc(grad.to(x.dtype))  # (B, H, W, Ci), (B, Ho, Wo, Co)
    batch, out_h, out_w, _ = grad_nhwc.shape
    out_channels, in_channels, kernel, _ = weight.shape
    grad_out_rows = grad_nhwc.view(-1, out_channels)
    weight_rows = _weight_rows(weight)
    # The input gradient: every output pixel's gradient @ W^T is a window's worth, scattered back to it.
    patches = (grad_out_rows @ weight_rows.t()).view(batch, out_h, out_w, kernel, kernel, in_channels)
    grad_x = _scatter_add_patches(torch.zeros_like(x_nhwc), patches, stride)
    windows = _gather_patches(x_nhwc, kernel, stride, (out_h, out_w))
    grad_weight = (windows.t() @ grad_out_rows).view(kernel, kernel, in_channels, out_channels)
    grad_bias = grad_out_rows.sum(0, dtype=bias_grad_dtype(x))
    return grad_x.permute(0, 3, 1, 2), grad_weight.permute(3, 2, 0, 1).contiguous(), grad_bias


@_conv2d_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int) -> tuple[torch.Tensor, ...]:
    return fake_grads(x, weight, out_channels=weight.shape[0])


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, stride = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride, ctx.bias_dtype = stride, bias.dtype


def _grads_from(backward_op: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[..., tuple]:
    def grads(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = backward_op(grad, x, weight, ctx.stride)
        return grad_x, grad_weight, grad_bias.to(ctx.bias_dtype), None

    return grads


_conv_transpose2d.register_autograd(_grads_from(_conv_transpose2d_backward), setup_context=_setup_context)
_conv2d.register_autograd(_grads_from(_conv2d_backward), setup_context=_setup_context)


def _operands(x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # The op computes in its input's dtype: cast here to autocast's dtype, as the library conv would.
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return x.to(dtype), layer.weight.to(dtype)


def conv2d_as_matmul(x: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    """`layer(x)` for x (B, Ci, H, W) as one matmul per pass (or the layer itself: `library_layer_runs`); the
    result is channels_last, in x's dtype (autocast's under autocast).

    For layers with padding 0, dilation 1 and groups 1, as the lab's are; equal to the layer up to rounding (the
    tests compare in float64). x may be any layout; channels_last makes the internal NHWC view free.
    """
    if library_layer_runs(x):
        return layer(x)
    return _conv2d(*_operands(x, layer), layer.bias, layer.stride[0])


def conv_transpose2d_as_matmul(x: torch.Tensor, layer: nn.ConvTranspose2d) -> torch.Tensor:
    """`layer(x)` for x (B, Ci, H, W) as one matmul per pass (or the layer itself: `library_layer_runs`); the
    result is channels_last, in x's dtype (autocast's under autocast). The same conditions as `conv2d_as_matmul`.
    """
    if library_layer_runs(x):
        return layer(x)
    return _conv_transpose2d(*_operands(x, layer), layer.bias, layer.stride[0])
