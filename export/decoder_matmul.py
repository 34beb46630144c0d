"""The decoder rewritten for export as plain matrix products: the same function, a faster graph for onnxruntime.

onnxruntime's CPU ConvTranspose runs one small GEMM per image and then a scalar col2im (measured on a 2-core
Xeon: col2im was about half of the decoder's 150 ms at batch 1024). Here each transposed convolution is

1. per kernel tap t, one GEMM over every pixel of the batch: cols[t, (pixel, b), :] = x[(pixel, b), :] @ W[:, :, t]
2. the overlap-add (col2im) as a second GEMM with a constant 0/1 matrix: out = S @ cols, S[o, (t, p)] = 1 where
   input pixel p through tap t lands on output pixel o; + bias, ReLU (onnxruntime fuses both into the Gemm).

Activations are pixel-major, (pixels, batch * channels), so both products are single large GEMMs whatever
the batch. A strided layer splits by output phase (o mod stride), since only the taps of one phase meet
its pixels: that keeps S 3.8x smaller for the stride-2 layers. BatchNorm (eval) is folded into the weights.
The rows of S are exact 0/1 sums, so the result equals the convolution up to fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn as nn

Pixel = tuple[int, int]


def fold_batchnorm(block: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (Cin, Cout, k, k), bias (Cout,)) of a [ConvTranspose2d, BatchNorm2d (eval), ReLU] block, or of
    a lone ConvTranspose2d, with the BatchNorm's affine map folded in."""
    conv = block[0]
    weight, bias = conv.weight.detach(), conv.bias.detach()
    if len(block) > 1:
        norm = block[1]
        scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
        weight = weight * scale[None, :, None, None]
        bias = (bias - norm.running_mean) * scale + norm.bias.detach()
    return weight, bias


class _TransposedConvAsMatmuls(nn.Module):
    """ConvTranspose2d (+ folded BatchNorm, + ReLU) on pixel-major activations (P_in * B, Cin) whose pixels
    come in the order `in_pixels`; returns (P_out * B, Cout) in the order `self.out_pixels`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, in_pixels: list[Pixel],
                 *, relu: bool) -> None:
        super().__init__()
        cin, cout, kernel, _ = weight.shape
        size_in = max(h for h, _ in in_pixels) + 1
        size_out = (size_in - 1) * stride + kernel
        where = {pixel: i for i, pixel in enumerate(in_pixels)}
        self.relu, self.cout, self.out_pixels = relu, cout, []
        self.weights = nn.ParameterList()
        self.phases = 0
        for row_phase in range(stride):
            for col_phase in range(stride):
                taps = [(i, j) for i in range(row_phase, kernel, stride) for j in range(col_phase, kernel, stride)]
                outs = [(i, j) for i in range(row_phase, size_out, stride) for j in range(col_phase, size_out, stride)]
                row_of = {pixel: i for i, pixel in enumerate(outs)}
                # Stored as bool (a quarter of the file size of fp32); the graph casts it once, at load.
                overlap = torch.zeros(len(outs), len(taps) * len(in_pixels), dtype=torch.bool)
                for t, (ti, tj) in enumerate(taps):
                    for (pi, pj), p in where.items():
                        overlap[row_of[pi * stride + ti, pj * stride + tj], t * len(in_pixels) + p] = True
                tap_weights = torch.stack([weight[:, :, ti, tj] for ti, tj in taps])  # (T, Cin, Cout)
                self.weights.append(nn.Parameter(tap_weights, requires_grad=False))
                self.register_buffer(f"overlap{self.phases}", overlap)
                self.phases += 1
                self.out_pixels += outs
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, batch: torch.Tensor | int) -> torch.Tensor:
        # The bias as a Gemm row: (1, B * Cout), each image's Cout biases side by side.
        bias = self.bias.expand(batch, self.cout).reshape(1, -1)
        phases = []
        for phase, weight in enumerate(self.weights):
            overlap = getattr(self, f"overlap{phase}").to(x.dtype)
            if self.cout == 1:
                # (T, Cin) @ (Cin, P_in * B): one GEMM; the batched form would be T matrix-vector products.
                cols = weight.squeeze(-1) @ x.T  # (T, P_in * B)
            else:
                cols = torch.matmul(x, weight)  # (T, P_in * B, Cout): T GEMMs sharing x
            out = torch.addmm(bias, overlap, cols.reshape(overlap.shape[1], -1))  # (P_phase, B * Cout)
            phases.append(torch.relu(out) if self.relu else out)
        return torch.cat(phases).reshape(-1, self.cout)  # (P_out * B, Cout)


class DecoderAsMatmuls(nn.Module):
    """z (B, Z) -> logits (B, C, 28, 28), the function of an eval-mode `fastvae.model.Decoder` (the lab's
    layers: ConvTranspose2d + BatchNorm + ReLU blocks, a final ConvTranspose2d) as matmuls, for export."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        first, *rest = decoder.gen
        weight, bias = fold_batchnorm(first)  # (Z, C1, 3, 3): on a 1x1 input, one matrix per output pixel
        size = weight.shape[-1]
        pixels = [(i, j) for i in range(size) for j in range(size)]
        self.first_weight = nn.Parameter(weight.flatten(2).permute(2, 0, 1).contiguous(), requires_grad=False)
        self.first_bias = nn.Parameter(bias.clone(), requires_grad=False)
        self.layers = nn.ModuleList()
        for index, block in enumerate(rest):
            weight, bias = fold_batchnorm(block)
            layer = _TransposedConvAsMatmuls(weight, bias, block[0].stride[0], pixels, relu=index < len(rest) - 1)
            self.layers.append(layer)
            pixels = layer.out_pixels
        self.channels, self.size = rest[-1][0].out_channels, max(i for i, _ in pixels) + 1
        rank = {pixel: i for i, pixel in enumerate(pixels)}
        # The last layer's rows are grouped by phase; this puts them back in image (row, column) order.
        order = [rank[i, j] for i in range(self.size) for j in range(self.size)]
        self.register_buffer("image_order", torch.tensor(order), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        x = torch.relu(torch.matmul(z, self.first_weight) + self.first_bias)  # (P, B, C1)
        x = x.reshape(-1, x.shape[-1])  # (P * B, C1)
        for layer in self.layers:
            x = layer(x, batch)
        pixels = x.reshape(-1, batch, self.channels)[self.image_order]  # (H * W, B, C)
        return pixels.permute(1, 2, 0).reshape(batch, self.channels, self.size, self.size)
