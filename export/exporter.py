"""`fastvae export`: one part of a trained VAE (decoder, encoder or the whole vae) as an ONNX graph with a dynamic
batch dimension, metadata describing its contract, verified against PyTorch before it replaces any file.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
import torch.nn as nn

import fastvae
from fastvae.checkpoint import load_model
from fastvae.config import DECODER_GRAPHS, PARTS, ModelConfig
from fastvae.errors import FastVAEError
from fastvae.export.decoder_matmul import DecoderAsMatmuls
from fastvae.export.opset import check_opset
from fastvae.export.verify import TOLERANCE, random_inputs, verify_onnx
from fastvae.files import atomic_write, check_output_file
from fastvae.model import VAE
from fastvae.run_folder import RECORD, load_record
from fastvae.runtime import INPUTS, META_DATA, META_IMAGE_SHAPE, META_PART, META_Z_DIM, OUTPUTS
from fastvae.splits import DATA_OPTIONS

# The example batch is 2, not 1: torch.export specializes dimensions of size 0 and 1 to constants.
_EXAMPLE_BATCH = 2


class DecoderPart(nn.Module):
    """z (B, Z) float32 -> images (B, C, 28, 28) float32 in [0, 1]; computes in the weights' dtype."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # The fast decoder returns logits; the exported contract is images, so the sigmoid lives in the graph.
        return torch.sigmoid(self.decoder(z.to(_dtype(self)))).float()


class EncoderPart(nn.Module):
    """images (B, C, 28, 28) float32 in [0, 1] -> mean (B, Z), log_sigma (B, Z) float32."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_sigma = self.encoder(images.to(_dtype(self)))
        return mean.float(), log_sigma.float()


class VAEPart(nn.Module):
    """images (B, C, 28, 28) in [0, 1], eps (B, Z) -> reconstruction (B, C, 28, 28) in [0, 1], mean, log_sigma.

    The caller supplies eps ~ N(0, I), so the graph holds no random op and is deterministic."""

    def __init__(self, vae: VAE, decoder: nn.Module) -> None:
        super().__init__()
        self.vae, self.decoder = vae, decoder  # the vae's encoder and reparameterization; `decoder` in its place

    def forward(self, images: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_sigma = self.vae.encode(images.to(_dtype(self)))
        z, _ = self.vae.reparameterize(mean, log_sigma, eps)  # the unused KL is pruned at export
        return torch.sigmoid(self.decoder(z)).float(), mean.float(), log_sigma.float()


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def part_module(model: VAE, part: str, decoder_graph: str = "matmul") -> nn.Module:
    """The eval-mode wrapper exporting `part` of `model` (float32 in and out, whatever the weights' dtype).

    decoder_graph "matmul" (the export's default) swaps in `DecoderAsMatmuls`, the decoder as matrix products,
    faster in onnxruntime on CPU (docs/export.md); "conv" keeps the model's own decoder, whose graph gets
    ConvTranspose nodes: the PyTorch reference that verification compares with.
    """
    if part not in PARTS:
        raise FastVAEError(f"unknown part {part!r}: choose one of {', '.join(PARTS)}")
    if decoder_graph not in DECODER_GRAPHS:
        raise FastVAEError(f"unknown decoder graph {decoder_graph!r}: choose one of {', '.join(DECODER_GRAPHS)}")
    model.eval()  # BatchNorm's running statistics: the exported function, and what DecoderAsMatmuls folds
    if part == "encoder":
        return EncoderPart(model.encode).eval()
    decoder = DecoderAsMatmuls(model.decode) if decoder_graph == "matmul" else model.decode
    return (DecoderPart(decoder) if part == "decoder" else VAEPart(model, decoder)).eval()


def describe(part: str, config: ModelConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Human-readable contract of each input and output, stored in the file's metadata."""
    image = f"(batch, {config.im_chan}, {config.image_size}, {config.image_size}) float32"
    latent = f"(batch, {config.z_dim}) float32"
    meaning = {
        "z": f"{latent} latent code; the prior is N(0, I)",
        "eps": f"{latent} standard-normal noise; z = mean + exp(log_sigma) * eps (zeros: the posterior mean)",
        "images": f"{image} pixels in [0, 1]",
        "reconstruction": f"{image} reconstructed pixels in [0, 1]",
        "mean": f"{latent} mean of q(z|x)",
        "log_sigma": f"{latent} log standard deviation of q(z|x)",
    }
    return {n: meaning[n] for n in INPUTS[part]}, {n: meaning[n] for n in OUTPUTS[part]}


def export_part(model: VAE, part: str, *, fp16: bool = False, opset: int | None = None,
                decoder_graph: str = "matmul") -> onnx.ModelProto:
    """Export `part` of an eval-mode fp32 `model` with the dynamo exporter; batch dimension dynamic.

    fp16: the weights and all arithmetic are float16, with Cast nodes at the graph's boundary, so the inputs
    and outputs stay float32 and callers need not know the precision.
    decoder_graph: "matmul" or "conv", the decoder's form in the graph (`part_module`); the encoder has one.
    """
    check_opset(opset)
    module = part_module(copy.deepcopy(model), part, decoder_graph)  # folded in fp32, then cast
    if fp16:
        module.half()
    batch = torch.export.Dim("batch")
    args = random_inputs(part, model.config, _EXAMPLE_BATCH)
    with warnings.catch_warnings():
        # images and eps share one Dim on purpose (equal batches); the exporter warns that it names it once.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = torch.onnx.export(
            module, args, dynamo=True, verbose=False, opset_version=opset, input_names=list(INPUTS[part]),
            output_names=list(OUTPUTS[part]), dynamic_shapes=tuple({0: batch} for _ in args),
        )
    proto = program.model_proto
    got = opset_of(proto)
    if opset is not None and got != opset:
        raise FastVAEError(f"the exporter could not convert the graph to opset {opset} (it stayed at {got})")
    return proto


def opset_of(proto: onnx.ModelProto) -> int:
    """The default (ai.onnx) opset version of a model."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def set_metadata(proto: onnx.ModelProto, values: dict[str, str]) -> None:
    """Set metadata_props entries, replacing existing keys (readable as onnxruntime's custom_metadata_map)."""
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=value)


def check_finite_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Refuse a model whose parameters or buffers (BatchNorm statistics too) hold NaN or infinity: its export
    would compute NaN images, however well the graph matches PyTorch."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FastVAEError(f"{checkpoint}: weight {name} holds NaN or infinity; this checkpoint cannot be "
                               "exported (train again or use an earlier run)")


def _data_metadata(checkpoint: Path) -> dict[str, str]:
    """The exported run's data options (fastvae.splits.DATA_OPTIONS), for `fastvae reconstruct` to find its test
    split; nothing for a bare weights file."""
    if not (checkpoint / RECORD).is_file():
        return {}
    saved = load_record(checkpoint)["train_config"]
    return {META_DATA: json.dumps({k: saved[k] for k in DATA_OPTIONS})}


def export_onnx(out: str | Path, checkpoint: str | Path, part: str = "decoder", *, opset: int | None = None,
                fp16: bool = False, decoder_graph: str = "matmul", verify: bool = True,
                log: Callable[[str], None] = print) -> float | None:
    """Export `part` of the run folder `checkpoint` to the ONNX file `out`; returns the verified max abs error
    (None with verify=False). `out` is replaced atomically, and only after verification passed; an `out` that
    cannot be written and a checkpoint holding NaN or infinity are refused before any export work."""
    out = check_output_file(out, "the ONNX file")  # before the export's seconds of work
    model, epoch = load_model(checkpoint)
    check_finite_weights(model, checkpoint)
    config = model.config
    model.eval()
    proto = export_part(model, part, fp16=fp16, opset=opset, decoder_graph=decoder_graph)
    inputs, outputs = describe(part, config)
    set_metadata(proto, {
        META_PART: part,
        META_Z_DIM: str(config.z_dim),
        META_IMAGE_SHAPE: json.dumps([config.im_chan, config.image_size, config.image_size]),
        "fastvae.inputs": json.dumps(inputs),
        "fastvae.outputs": json.dumps(outputs),
        "fastvae.precision": "float16" if fp16 else "float32",
        "fastvae.decoder_graph": decoder_graph if part != "encoder" else "none",
        "fastvae.version": fastvae.__version__,
        "fastvae.checkpoint": str(Path(checkpoint).resolve()),
        "fastvae.epoch": str(epoch),
        **_data_metadata(Path(checkpoint)),
    })
    error = None
    if verify:
        # Verified as the exact bytes that get written (the parity entry aside), so a failing graph never
        # reaches the disk and an existing `out` stays as it was.
        reference = part_module(model, part, decoder_graph="conv")
        error = verify_onnx(proto.SerializeToString(), reference, part, config, fp16=fp16, log=log)
        parity = f"{error:.3g} max abs error vs PyTorch fp32 (tolerance {TOLERANCE[fp16]:g})"
    else:
        parity = "not verified (--no-verify)"
    set_metadata(proto, {"fastvae.parity": parity})
    data = proto.SerializeToString()
    atomic_write(out, lambda f: f.write(data))
    log(f"wrote {out}: {part}, opset {opset_of(proto)}, {'float16' if fp16 else 'float32'}, "
        f"{len(data) / 1e6:.2f} MB, parity {parity}")
    return error
