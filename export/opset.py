"""The ONNX opsets `fastvae export` can write, checked without torch, so a bad --opset answers at once."""

from __future__ import annotations

import onnx

from fastvae.errors import FastVAEError

# NOTE: measured (torch 2.14, onnx 1.23): the exporter builds opset 18+ and down-converts; below 16 the ONNX
# converter has no adapter for this graph (Identity) and the export stays at 18.
MIN_OPSET = 16


def check_opset(opset: int | None) -> None:
    """Refuse an opset outside [MIN_OPSET, onnx's newest]; None (the exporter's recommended one) passes."""
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise FastVAEError(f"--opset {opset} is not supported: choose {MIN_OPSET} to {newest}, or leave it out for "
                           "the exporter's recommended opset")
