"""Fuzzing OnnxVAE's loader with Hypothesis: a truncated, bit-flipped or mis-headed export either loads and decodes
to finite images or raises a one-line ValueError; never another exception, a crash, a hang or a runaway allocation.
"""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fastvae.checkpoint import save_checkpoint
from fastvae.config import ModelConfig, TrainConfig
from fastvae.export.exporter import export_onnx
from fastvae.model import VAE
from fastvae.plan import cpu_plan
from fastvae.run_folder import new_record
from fastvae.runtime import OnnxVAE

# A 0.24 MB decoder file of which 0.1 MB is graph, names, metadata and index tables rather than float weights, so
# that flips land in the structure often. NOTE: each example loads in ~15 ms on a 2-core Xeon.
CONFIG = ModelConfig(z_dim=3, encoder_hidden=4, decoder_hidden=8)
FUZZ = settings(max_examples=100, derandomize=True, database=None, deadline=timedelta(seconds=3))
HEAD = 4096  # the first bytes: the model header and the first graph nodes
# Headroom over this process's address space while fuzzing: a damaged size that made onnxruntime allocate
# gigabytes fails inside it (and must surface as ValueError) instead of taking the machine's memory.
MEMORY_HEADROOM = 3 << 30
HANG_S = 300  # the whole module; a hang in onnxruntime's C++ would outlast any per-example deadline


@dataclass(frozen=True)
class Export:
    data: bytes
    structure: list[int]  # byte offsets outside the float weights' raw data
    path: Path  # where each damaged copy is written

    def __repr__(self) -> str:  # Hypothesis prints the fixture with a failing example
        return f"Export({len(self.data)} bytes, {len(self.structure)} outside the weights)"


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Export:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "run").mkdir()
    save_checkpoint(folder / "run", VAE(CONFIG), CONFIG, new_record(CONFIG, TrainConfig(), cpu_plan()), {})
    export_onnx(folder / "decoder.onnx", folder / "run", "decoder", verify=False, log=lambda _: None)
    data = (folder / "decoder.onnx").read_bytes()
    weights = np.zeros(len(data), bool)
    for tensor in onnx.load_from_string(data).graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.raw_data) >= 64:
            start = data.index(tensor.raw_data)
            weights[start : start + len(tensor.raw_data)] = True
    return Export(data, np.flatnonzero(~weights).tolist(), folder / "damaged.onnx")


@pytest.fixture(scope="module", autouse=True)
def guarded(export: Export) -> Iterator[None]:
    """Cap the address space (on Linux) and kill the process with tracebacks if the module hangs."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    limits = None
    if sys.platform == "linux":
        import resource

        limits = resource.getrlimit(resource.RLIMIT_AS)
        used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
        cap = used + MEMORY_HEADROOM
        hard = limits[1]
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        if limits is not None:
            resource.setrlimit(resource.RLIMIT_AS, limits)
        faulthandler.cancel_dump_traceback_later()


def _load_and_decode(export: Export, data: bytes) -> None:
    """The property: load and decode a tiny batch; a finite result or a one-line ValueError, nothing else."""
    export.path.write_bytes(data)
    try:
        vae = OnnxVAE(export.path, device="cpu", split_batches=False)
    except ValueError as e:
        assert str(e) and "\n" not in str(e), repr(e)
        event("refused at load")
        return
    try:
        images = vae.decode(np.full((2, CONFIG.z_dim), 0.5, np.float32))
    except ValueError as e:
        assert str(e) and "\n" not in str(e), repr(e)
        event("loaded, refused at decode")
        return
    assert images.shape == (2, *vae.image_shape) and np.isfinite(images).all()
    event("loaded and decoded")


def _bits(export: Export) -> st.SearchStrategy[int]:
    """A bit position: half anywhere (mostly weights, by size), half in the graph's structure."""
    anywhere = st.integers(0, 8 * len(export.data) - 1)
    structure = st.builds(lambda i, bit: 8 * export.structure[i] + bit,
                          st.integers(0, len(export.structure) - 1), st.integers(0, 7))
    return st.one_of(anywhere, structure)


def _flipped(data: bytes, bits: list[int]) -> bytes:
    damaged = bytearray(data)
    for bit in bits:
        damaged[bit // 8] ^= 1 << (bit % 8)
    return bytes(damaged)


def test_the_undamaged_file_decodes(export: Export) -> None:
    vae = OnnxVAE(export.path.with_name("decoder.onnx"), device="cpu")
    assert np.isfinite(vae.sample(2, seed=0)).all()


# The strategies depend on the export, a fixture, so each test draws from them through st.data().
@FUZZ
@given(st.data())
def test_truncated(export: Export, data: st.DataObject) -> None:
    size = len(export.data)
    length = data.draw(st.one_of(st.integers(0, HEAD), st.integers(0, size - 1), st.integers(size - HEAD, size - 1)),
                       label="length")
    _load_and_decode(export, export.data[:length])


@FUZZ
@given(st.data())
def test_one_bit_flipped(export: Export, data: st.DataObject) -> None:
    _load_and_decode(export, _flipped(export.data, [data.draw(_bits(export), label="bit")]))


@FUZZ
@given(st.data())
def test_many_bits_flipped(export: Export, data: st.DataObject) -> None:
    bits = data.draw(st.lists(_bits(export), min_size=2, max_size=32, unique=True), label="bits")
    _load_and_decode(export, _flipped(export.data, bits))


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(0, 64))
def test_wrong_header(export: Export, prefix: bytes, dropped: int) -> None:
    """Random bytes written over, or put before, the start of the file."""
    _load_and_decode(export, prefix + export.data[dropped:])
