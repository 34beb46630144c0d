"""The decoder rewritten for export as plain matrix products: the same function, a faster graph for onnxruntime."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fastvae.winograd import point_weights, transforms_2d

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


def _output_size(in_pixels: list[Pixel], stride: int, kernel: int) -> int:
    """Side of a transposed convolution's square output, from its input pixels' (row, column) pairs."""
    return max(row for row, _ in in_pixels) * stride + kernel


def _matrices(weight: torch.Tensor, taps: list[Pixel]) -> nn.ParameterList:
    """The (Cin, Cout) matrix of each kernel tap (row, column) of a (Cin, Cout, k, k) weight, as constants."""
    return nn.ParameterList([nn.Parameter(weight[:, :, i, j].clone(), requires_grad=False) for i, j in taps])


class _StrideOneConvAsWinograd(nn.Module):
    """ConvTranspose2d (stride 1) + folded BatchNorm + ReLU on pixel-major activations (P_in * B, Cin), pixels in
    row-major order, by Toom-Cook (Winograd) minimal filtering; returns [(P_out * B, Cout)], row-major.

    With stride 1 the layer is a full 2D linear convolution of each input channel with each kernel. Evaluated at
    n points per axis it becomes n^2 independent channel products: points = T_in @ x (one Gemm over the input
    pixels), one matmul per point with the weights transformed at export, out = T_out @ products + bias, ReLU
    (one Gemm). For the lab's 3x3 -> 6x6 layer that is 36 products of (B, Cin) x (Cin, Cout) instead of 144,
    and no overlap-add: 2.3x faster in onnxruntime (single thread, batch 32). The method, and the fp32 rounding
    its transforms add, are `fastvae.winograd`'s: the training path computes the same layer the same way.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, in_pixels: list[Pixel]) -> None:
        super().__init__()
        cin, cout, kernel, _ = weight.shape
        size_in = math.isqrt(len(in_pixels))
        if in_pixels != [(i, j) for i in range(size_in) for j in range(size_in)]:
            raise ValueError("the Winograd layer needs its input pixels as a whole square grid, row by row")
        points_in, evaluate_kernel, points_out = transforms_2d(size_in, kernel)
        self.points_in = nn.Parameter(points_in.to(weight.dtype), requires_grad=False)  # (points, P_in)
        self.points_out = nn.Parameter(points_out.to(weight.dtype), requires_grad=False)  # (P_out, points)
        weights = point_weights(weight.double(), evaluate_kernel)  # transformed in float64, rounded once
        self.point_weights = nn.Parameter(weights.to(weight.dtype), requires_grad=False)
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)
        self.cin, self.cout = cin, cout
        size_out = size_in + kernel - 1
        self.out_pixels = [(i, j) for i in range(size_out) for j in range(size_out)]

    def forward(self, x: torch.Tensor, batch: torch.Tensor | int) -> list[torch.Tensor]:
        points = torch.matmul(self.points_in, x.reshape(self.points_in.shape[1], -1))  # (n^2, B * Cin)
        products = torch.matmul(points.reshape(len(self.point_weights), -1, self.cin), self.point_weights)
        bias = self.bias.expand(batch, self.cout).reshape(1, -1)  # a Gemm row: each image's Cout biases
        out = torch.relu(torch.addmm(bias, self.points_out, products.reshape(len(self.point_weights), -1)))
        return [out.reshape(-1, self.cout)]  # (P_out * B, Cout)


class _TransposedConvAsMatmuls(nn.Module):
    """ConvTranspose2d + folded BatchNorm + ReLU on pixel-major activations (P_in * B, Cin) whose pixels
    come in the order `in_pixels`; returns one (P * B, Cout) tensor per output phase, their pixels in the
    order `self.out_pixels` (the phases' pixels one after the other).

    1. per kernel tap t, one GEMM over every pixel of the batch: cols[t, (pixel, b), :] = x[(pixel, b), :] @ W[:, :, t],
       the taps' products stacked tap-major by a Concat
    2. the overlap-add (col2im) as a second GEMM with a constant 0/1 matrix S (`overlap`): out = S @ cols,
       S[o, (t, p)] = 1 where input pixel p through tap t lands on output pixel o; + bias, ReLU (onnxruntime fuses
       both into the Gemm).

    Every product is 2-D by 2-D. One MatMul of x (P_in * B, Cin) with the stacked (T, Cin, Cout) taps would
    broadcast x over the taps, which OpenVINO's CPU plugin cannot do when the batch is dynamic (see
    DecoderAsMatmuls). The Concat costs 3% of the decoder's kernel time in onnxruntime's profile at batch 64
    (2-core AMD EPYC), too little to show on the wall clock.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, in_pixels: list[Pixel]) -> None:
        super().__init__()
        cin, cout, kernel, _ = weight.shape
        size_out = _output_size(in_pixels, stride, kernel)
        where = {pixel: i for i, pixel in enumerate(in_pixels)}
        self.cout, self.out_pixels = cout, []
        self.weights = nn.ModuleList()  # per phase, its taps' (Cin, Cout) matrices
        # By output phase (o mod stride): only the taps of one phase meet its pixels, which keeps S 3.8x smaller
        # for the stride-2 layers.
        for row_phase in range(stride):
            for col_phase in range(stride):
                taps = [(i, j) for i in range(row_phase, kernel, stride) for j in range(col_phase, kernel, stride)]
                outs = [(i, j) for i in range(row_phase, size_out, stride) for j in range(col_phase, size_out, stride)]
                if len(taps) == 1 and len(outs) == len(in_pixels):
                    # One tap reaching every pixel of its phase once: nothing overlaps, so the phase is one
                    # Gemm with bias and ReLU, its pixels in the input's order.
                    (ti, tj), = taps
                    self.weights.append(_matrices(weight, taps))
                    self.out_pixels += [(pi * stride + ti, pj * stride + tj) for pi, pj in in_pixels]
                    continue
                row_of = {pixel: i for i, pixel in enumerate(outs)}
                # Stored as bool (a quarter of the file size of fp32); the graph casts it once, at load.
                overlap = torch.zeros(len(outs), len(taps) * len(in_pixels), dtype=torch.bool)
                for t, (ti, tj) in enumerate(taps):
                    for (pi, pj), p in where.items():
                        overlap[row_of[pi * stride + ti, pj * stride + tj], t * len(in_pixels) + p] = True
                self.register_buffer(f"overlap{len(self.weights)}", overlap)
                self.weights.append(_matrices(weight, taps))
                self.out_pixels += outs
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, batch: torch.Tensor | int) -> list[torch.Tensor]:
        # The bias as a Gemm row: (1, B * Cout), each image's Cout biases side by side.
        bias = self.bias.expand(batch, self.cout).reshape(1, -1)
        phases = []
        for phase, taps in enumerate(self.weights):
            overlap = getattr(self, f"overlap{phase}", None)
            if overlap is None:  # the phase with one tap and no overlap
                phases.append(torch.relu(torch.addmm(self.bias, x, taps[0])))
                continue
            products = [torch.mm(x, tap) for tap in taps]
            cols = torch.cat(products) if len(products) > 1 else products[0]  # (T * P_in * B, Cout), tap-major
            overlap = overlap.to(x.dtype)
            phase_out = torch.relu(torch.addmm(bias, overlap, cols.reshape(overlap.shape[1], -1)))
            phases.append(phase_out.reshape(-1, self.cout))
        return phases  # each (P * B, Cout)


class _OutputConvAsGatherSum(nn.Module):
    """The decoder's last ConvTranspose2d (no BatchNorm, no ReLU) on pixel-major activations (P_in * B, Cin)
    split into phases whose pixels, one phase after the other, come in the order `in_pixels`; returns
    (Cout, P_out, B), output pixels in image (row, column) order.

    Its output is small (Cout is the image's channels), so the overlap-add gathers each output pixel's few
    (tap, pixel) rows and sums them: a dense overlap matrix would be 2 MB here, read whole even at batch 1.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, in_pixels: list[Pixel]) -> None:
        super().__init__()
        cin, cout, kernel, _ = weight.shape
        size_out = _output_size(in_pixels, stride, kernel)
        taps = [(i, j) for i in range(kernel) for j in range(kernel)]
        # Rows of cols = weight @ x^T + bias column: one per (tap, channel), then two more taps, all-zero
        # weights: the padding for pixels with fewer contributions (bias 0) and the bias itself, so that the
        # sum adds it and no broadcast Add is left (one measured 0.3 ms at batch 64).
        rows = [weight[:, c, i, j] for i, j in taps for c in range(cout)]
        self.weight = nn.Parameter(torch.stack(rows + [weight.new_zeros(cin)] * 2 * cout), requires_grad=False)
        self.bias = nn.Parameter(torch.cat([bias.new_zeros((len(taps) + 1) * cout), bias])[:, None],
                                 requires_grad=False)
        # Row of ((tap, channel, pixel), B) cols holding tap t, channel c, input pixel p.
        def row(t: int, c: int, p: int) -> int:
            return (t * cout + c) * len(in_pixels) + p

        sources: dict[Pixel, list[tuple[int, int]]] = {(i, j): [] for i in range(size_out) for j in range(size_out)}
        for t, (ti, tj) in enumerate(taps):
            for p, (pi, pj) in enumerate(in_pixels):
                sources[pi * stride + ti, pj * stride + tj].append((t, p))
        most = max(map(len, sources.values()))
        zero, with_bias = len(taps), len(taps) + 1
        gather = [[row(t, c, p) for t, p in found] + [row(with_bias, c, 0)] + [row(zero, c, 0)] * (most - len(found))
                  for c in range(cout) for found in sources.values()]
        # (most + 1, Cout * P_out): the rows of cols that sum to each output; the outer axis is summed over.
        self.register_buffer("rows", torch.tensor(gather).T.contiguous())
        self.register_buffer("ones", weight.new_ones(1, most + 1))
        self.cout, self.size = cout, size_out

    def forward(self, phases: list[torch.Tensor], batch: torch.Tensor | int) -> torch.Tensor:
        # One Gemm per input phase and a concatenation of their products, which are smaller than the phases.
        cols = [torch.addmm(self.bias, self.weight, x.T) for x in phases]
        cols = (torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]).reshape(-1, batch)  # ((T+2)*Cout*P_in, B)
        gathered = cols.index_select(0, self.rows.flatten()).reshape(self.rows.shape[0], -1)
        # Summed as a product with ones: onnxruntime's ReduceSum over the outer axis took 8x longer here.
        return torch.matmul(self.ones, gathered).reshape(self.cout, -1, batch)  # (Cout, P_out, B)


# NOTE: 2-core Xeon: onnxruntime's CPU ConvTranspose runs one small GEMM per image and then a scalar col2im, which
# took about half of the decoder's 150 ms at batch 1024.
class DecoderAsMatmuls(nn.Module):
    """z (B, Z) -> logits (B, C, 28, 28), the function of an eval-mode `fastvae.model.Decoder` (the lab's
    layers: ConvTranspose2d + BatchNorm + ReLU blocks, a final ConvTranspose2d) as matmuls, for export.

    Activations are pixel-major, (pixels, batch * channels), so a layer's products are single large GEMMs whatever
    the batch. The overlap-adds are exact sums of products, so the result equals the convolution up to fp32 summation
    order (and the Winograd layer's rounding, `fastvae.winograd`).
    """

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        first, *rest = decoder.gen
        weight, bias = fold_batchnorm(first)  # (Z, C1, 3, 3): on a 1x1 input, one matrix per output pixel
        size = weight.shape[-1]
        pixels = [(i, j) for i in range(size) for j in range(size)]
        self.first_weight = nn.Parameter(weight.flatten(2).permute(2, 0, 1).contiguous(), requires_grad=False)
        self.first_bias = nn.Parameter(bias.clone(), requires_grad=False)
        *hidden, last = rest
        self.layers = nn.ModuleList()
        for block in hidden:
            weight, bias = fold_batchnorm(block)
            stride = block[0].stride[0]
            self.layers.append(_StrideOneConvAsWinograd(weight, bias, pixels) if stride == 1
                               else _TransposedConvAsMatmuls(weight, bias, stride, pixels))
            pixels = self.layers[-1].out_pixels
        weight, bias = fold_batchnorm(last)
        self.output = _OutputConvAsGatherSum(weight, bias, last[0].stride[0], pixels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        # z is expanded to (P, B, Z) rather than broadcast by the MatMul: OpenVINO's CPU plugin (2026.4.1) cannot
        # broadcast a dynamic-batch input over a constant's leading axis (rank 2 against rank 3: "Can't create
        # dummy inputs if argument shapes ranks are not equal"). The copy, P * B * Z floats, is an eighth of x.
        z = z.expand(len(self.first_weight), -1, -1)
        x = torch.relu(torch.matmul(z, self.first_weight) + self.first_bias)  # (P, B, C1)
        x = x.reshape(-1, x.shape[-1])  # (P * B, C1)
        phases = [x]
        for layer in self.layers:
            phases = layer(torch.cat(phases) if len(phases) > 1 else phases[0], batch)
        pixels = self.output(phases, batch)  # (C, H * W, B)
        return pixels.permute(2, 0, 1).reshape(batch, -1, self.output.size, self.output.size)
