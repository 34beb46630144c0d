"""FLOPs of the model, counted once from its layer shapes (a multiply-add is 2 FLOPs)."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastvae.config import ModelConfig


def _conv_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    kernel = module.weight[0, 0].numel()  # kh * kw
    if isinstance(module, nn.ConvTranspose2d):
        # Every input pixel scatters a (Cout, kh, kw) patch: Cin * Cout * kh * kw MACs per input pixel.
        return 2 * module.in_channels * module.out_channels * kernel * inputs[0][0, 0].numel()
    return 2 * module.in_channels * module.out_channels * kernel * output[0, 0].numel()


def forward_flops(config: ModelConfig = ModelConfig()) -> dict[str, int]:
    """Convolution FLOPs per image of one forward pass: {'encoder': ..., 'decoder': ..., 'forward': ...}.

    Elementwise work (BatchNorm, activations, loss) is under 1% and left out.
    """
    from fastvae.reference import VAE

    model = VAE(config).eval()
    counts: dict[str, int] = {"encoder": 0, "decoder": 0}
    hooks = []
    for part, submodule in (("encoder", model.encode), ("decoder", model.decode)):
        for layer in submodule.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                def count(module, inputs, output, part=part):
                    counts[part] += _conv_flops(module, inputs, output)
                hooks.append(layer.register_forward_hook(count))
    with torch.no_grad():
        model(torch.zeros(1, config.im_chan, config.image_size, config.image_size), torch.zeros(1, config.z_dim))
    for hook in hooks:
        hook.remove()
    return {**counts, "forward": counts["encoder"] + counts["decoder"]}


def train_step_flops(config: ModelConfig = ModelConfig()) -> int:
    """FLOPs per image of a training step: forward plus a backward that costs twice the forward."""
    return 3 * forward_flops(config)["forward"]
