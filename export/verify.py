"""Parity of an exported graph: the ONNX full checker, then onnxruntime against PyTorch on fresh random inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn as nn

from fastvae.config import ModelConfig
from fastvae.errors import FastVAEError
from fastvae.runtime import INPUTS, OUTPUTS, make_session

# Max abs error allowed against the fp32 PyTorch model, by whether the graph computes in float16.
# NOTE: measured on the CPU provider with an 8-epoch Fashion-MNIST checkpoint: fp32 <= 1.7e-6 (BatchNorm is
# folded into the convolutions, which reorders sums), fp16 <= 2.7e-3.
TOLERANCE = {False: 1e-4, True: 1e-2}
# Batch sizes checked: none is the export's example batch (2), so a batch pinned at export fails here.
BATCHES = (1, 7, 256)


def random_inputs(part: str, config: ModelConfig, batch: int) -> tuple[torch.Tensor, ...]:
    """Fresh float32 inputs of `part`, in INPUTS order: latents and eps ~ N(0, I), images ~ U[0, 1]."""
    image = (batch, config.im_chan, config.image_size, config.image_size)
    return tuple(torch.rand(image) if name == "images" else torch.randn(batch, config.z_dim)
                 for name in INPUTS[part])


def verify_onnx(model: bytes, reference: nn.Module, part: str, config: ModelConfig, *, fp16: bool,
                log: Callable[[str], None] = print) -> float:
    """Check the serialized ONNX `model` and compare it with `reference` (the fp32 PyTorch wrapper of `part`)
    at each of BATCHES. Prints max abs and relative error per output; returns the largest abs error, or
    raises FastVAEError when it exceeds TOLERANCE[fp16] or when either side's output holds NaN or infinity.

    Relative error is max |onnx - torch| / max |torch| per output: elementwise ratios explode near zero.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise FastVAEError(f"the exported graph fails the ONNX checker: {e}") from e
    try:
        session = make_session(model)
    except ValueError as e:
        raise FastVAEError(f"onnxruntime cannot load the exported graph: {e}") from e
    log(f"verifying against PyTorch on onnxruntime {session.get_providers()[0]}, batches {BATCHES}")
    worst = 0.0
    for batch in BATCHES:
        inputs = random_inputs(part, config, batch)
        got = session.run(list(OUTPUTS[part]), {n: x.numpy() for n, x in zip(INPUTS[part], inputs, strict=True)})
        with torch.no_grad():
            want = reference(*inputs)
        want = want if isinstance(want, tuple) else (want,)
        for name, actual, expected in zip(OUTPUTS[part], got, want, strict=True):
            expected = expected.numpy()
            if actual.shape != expected.shape:
                raise FastVAEError(f"{name} has shape {actual.shape} in onnxruntime, {expected.shape} in PyTorch")
            # Checked on its own: NaN makes the error NaN, and max(worst, nan) would keep `worst` and pass.
            broken = [side for side, x in (("PyTorch", expected), ("onnxruntime", actual)) if not np.isfinite(x).all()]
            if broken:
                raise FastVAEError(f"verification failed: {part} output {name!r} at batch {batch} is not finite in "
                                   f"{' and '.join(broken)} (NaN or inf); the file was not written")
            error = float(np.abs(actual.astype(np.float64) - expected).max())
            scale = float(np.abs(expected).max())
            log(f"  batch {batch:>3} {name:<14} max abs error {error:.2e}  relative {error / max(scale, 1e-30):.2e}")
            worst = max(worst, error)
    tolerance = TOLERANCE[fp16]
    if not worst <= tolerance:  # `not <=` also catches NaN
        raise FastVAEError(
            f"onnxruntime differs from PyTorch by {worst:.3g} > {tolerance:g} ({'float16' if fp16 else 'float32'});"
            " the file was not written"
        )
    return worst
