"""Run an exported fastvae ONNX file with onnxruntime and numpy alone (no torch): sample, decode, encode, reconstruct.

Every check on the caller's input raises ValueError naming what was expected, so other apps need no fastvae types.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from fastvae.config import DEVICES

if TYPE_CHECKING:  # imported for real only when backend='openvino' is asked for
    from fastvae.openvino_backend import OpenVINOModel

# The graph contract of each part written by `fastvae export`: input and output names, in order.
INPUTS = {"decoder": ("z",), "encoder": ("images",), "vae": ("images", "eps")}
OUTPUTS = {"decoder": ("images",), "encoder": ("mean", "log_sigma"), "vae": ("reconstruction", "mean", "log_sigma")}
# Keys in the ONNX file's metadata_props, written by fastvae.export.exporter.
META_PART, META_Z_DIM, META_IMAGE_SHAPE = "fastvae.part", "fastvae.z_dim", "fastvae.image_shape"
# The data options of the run the file was exported from (JSON), so `fastvae reconstruct` reads its test split.
META_DATA = "fastvae.data"
# On CPU a batch that holds a decoder and at least MIN_PIECE images per core is split into pieces of at most
# MAX_PIECE that run at the same time, one thread each. Measured on a 2-core Xeon, default decoder graph: batch
# 1024 took 46 ms in pieces of 64 against 54 ms whole on onnxruntime's threads, batch 128 5.7 against 6.5 ms,
# and batch 24 1.54 against 1.45 ms. The encoder's Conv nodes use onnxruntime's threads well: pieces made it
# slower at every batch (batch 64: 0.54 against 0.26 ms), so it runs whole.
MIN_PIECE, MAX_PIECE = 16, 64
# What runs the graph: onnxruntime (any device), or OpenVINO's CPU plugin (`pip install openvino`, imported only then).
BACKENDS = ("onnxruntime", "openvino")
# OpenVINO runs a whole batch well on all cores up to MAX_PIECE images per core, so it splits only from there.
# NOTE: 2-core AMD EPYC, default decoder graph, whole against in pieces (ms): batch 64 3.3 / 3.6, 96 4.7 / 5.0,
# 128 6.5 / 5.9, 256 15.3 / 11.2. Every part is split: the encoder at batch 1024 took 6.0 ms in pieces of 64
# against 13.7 ms whole.
OPENVINO_MIN_PIECE = MAX_PIECE


def physical_cores() -> int:
    """Physical cores this process may use: SMT siblings share one core's FPUs, so more threads only contend."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    cores, physical = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            cores.add((physical, value.strip()))
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(len(cores) or allowed, allowed))


def gpu_present() -> bool:
    """True when the CUDA driver sees a GPU. Asked before requesting CUDA from onnxruntime, which otherwise
    prints a loud error and falls back; the driver API is used so no torch import is needed."""
    try:
        driver = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def batch_pieces(batch: int, workers: int, min_piece: int = MIN_PIECE) -> list[tuple[int, int]]:
    """(start, stop) ranges that split a batch for `workers` single-threaded runs at a time: the whole batch
    when it has fewer than `min_piece` images per worker, else pieces of at most MAX_PIECE images, as many as
    a multiple of `workers` so that no worker idles at the end."""
    if workers < 2 or batch < min_piece * workers:
        return [(0, batch)]
    count = -(-max(workers, -(-batch // MAX_PIECE)) // workers) * workers
    size = -(-batch // count)
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]


def make_session(model: str | Path | bytes, device: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session on CUDA when `device` allows it and a GPU is there, else on CPU, with `threads`
    intra-op threads (default: the physical cores).

    `session.get_providers()[0]` says which provider runs the graph. Raises ValueError for an unreadable model.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    cuda = device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers() and gpu_present()
    if device == "cuda" and not cuda:
        raise ValueError("device 'cuda' asked for, but onnxruntime has no CUDA provider or no GPU is present")
    if cuda:
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, which torch would otherwise have loaded
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's CUDA provider defaults to TF32 convolutions and matmuls (~1e-3 error): a float32 file keeps
    # float32 accuracy on every device, and --fp16 is the fast option.
    cuda_provider = ("CUDAExecutionProvider", {"use_tf32": "0"})
    providers = [cuda_provider, "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    source = model if isinstance(model, bytes) else str(model)
    try:
        # Without a GPU there is nothing to fall back to: onnxruntime's fallback would only print an
        # "EP Error" banner on stdout and load a bad file a second time.
        session = ort.InferenceSession(source, options, providers=providers, enable_fallback=int(cuda))
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a bad file
        name = "the model" if isinstance(model, bytes) else str(model)
        raise ValueError(f"{name} is not a loadable ONNX model (corrupt, truncated or not ONNX): {_one_line(e)}") from e
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ValueError("device 'cuda' asked for, but onnxruntime could not start its CUDA provider")
    return session


def _openvino_model(path: Path, device: str, streams: int, threads: int) -> OpenVINOModel:
    """`path` compiled by OpenVINO on the CPU (fastvae.openvino_backend.OpenVINOModel), fp32, `streams` streams."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        raise ValueError("backend 'openvino' runs on the CPU only: use device 'cpu' or 'auto'")
    try:
        from fastvae.openvino_backend import OpenVINOModel
    except ImportError as e:
        raise ValueError(f"backend 'openvino' needs OpenVINO, which is not installed: pip install openvino "
                         f"({_one_line(e)})") from e
    return OpenVINOModel(path, streams=streams, threads=threads, fixed_batch=MAX_PIECE)


def _one_line(error: BaseException) -> str:
    """An exception's message on one line: onnxruntime's span several, and the CLI prints exactly one."""
    return " ".join(str(error).split())


def _check_array(array: object, name: str, shape: tuple[int | None, ...], unit: bool) -> np.ndarray:
    """`array` as C-contiguous float32 of `shape` (None: any size >= 1), finite, and in [0, 1] if `unit`.

    A float array of any precision is converted to float32; integer, bool and other dtypes raise ValueError."""
    expected = "(" + ", ".join("B" if d is None else str(d) for d in shape) + ")"
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of shape {expected}, got {type(array).__name__}")
    if not np.issubdtype(array.dtype, np.floating):
        hint = " (uint8 images: divide by 255)" if array.dtype == np.uint8 else ""
        raise ValueError(f"{name} must be a float array (float32 preferred), got {array.dtype}{hint}")
    fits = array.ndim == len(shape) and all(d in (None, s) for d, s in zip(shape, array.shape, strict=True))
    if not fits or array.shape[0] < 1:
        raise ValueError(f"{name} must have shape {expected} with B >= 1, got {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinity")
    if unit and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{array.min():.3g}, {array.max():.3g}]")
    return array


class OnnxVAE:
    """A fastvae ONNX export (decoder, encoder or vae part) with numpy in and numpy out.

    Images are float32 (B, C, 28, 28) in [0, 1]; latents float32 (B, Z). Shapes and part come from the file's
    metadata. Every run goes through IO binding with the caller's numpy buffers (on CUDA: one copy each way).

    On a multi-core CPU, large batches through a decoder run as pieces on all cores at once, one thread each
    (see MIN_PIECE); `split_batches=False` runs every batch whole, on onnxruntime's own threads.

    backend="openvino" runs the file with OpenVINO on the CPU instead (fp32), with the same methods and checks;
    every part splits from OPENVINO_MIN_PIECE images per core, one stream per core (fastvae.openvino_backend).
    """

    def __init__(self, path: str | Path, device: str = "auto", split_batches: bool = True,
                 backend: str = "onnxruntime") -> None:
        self.path = Path(path)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not self.path.is_file():
            raise ValueError(f"no ONNX model at {self.path}: expected a file written by `fastvae export`")
        self.backend = backend
        self._openvino = None
        if backend == "openvino":
            cores = physical_cores()
            self._openvino = _openvino_model(self.path, device, cores if split_batches else 1, cores)
        else:
            self.session = make_session(self.path, device)
        try:  # a damaged file can hold names that are not UTF-8: UnicodeDecodeError is a ValueError
            if self._openvino is not None:
                meta = self._openvino.metadata
            else:
                meta = self.session.get_modelmeta().custom_metadata_map
            self.part = meta[META_PART]
            self.z_dim = int(meta[META_Z_DIM])
            self.image_shape: tuple[int, int, int] = tuple(json.loads(meta[META_IMAGE_SHAPE]))
            if self.z_dim < 1 or len(self.image_shape) != 3 or not all(type(d) is int and d > 0
                                                                        for d in self.image_shape):
                raise ValueError(f"z_dim {self.z_dim} and image shape {self.image_shape} are not sizes")
            if self._openvino is not None:
                inputs, outputs = self._openvino.inputs, self._openvino.outputs
            else:
                inputs, outputs = ([(v.name, v.type, v.shape) for v in values]
                                   for values in (self.session.get_inputs(), self.session.get_outputs()))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{self.path} is an ONNX model but not a fastvae export (its metadata or graph: "
                             f"{_one_line(e)})") from e
        names = ([name for name, _, _ in inputs], [name for name, _, _ in outputs])
        if self.part not in INPUTS or names != (list(INPUTS[self.part]), list(OUTPUTS[self.part])):
            raise ValueError(f"{self.path}: part {self.part!r} with inputs/outputs {names} is not a fastvae export")
        self._check_graph_shapes(inputs + outputs)
        self.metadata = dict(meta)
        # onnxruntime logs a failing run's error to stderr as well as raising it; the ValueError carries it, and
        # the CLI prints exactly one line.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4  # fatal only
        split = split_batches and self.provider == "CPUExecutionProvider" and self.part != "encoder"
        if self._openvino is not None:
            split = split_batches  # every part, see OPENVINO_MIN_PIECE
        self._workers = physical_cores() if split else 1
        self._min_piece = OPENVINO_MIN_PIECE if self._openvino is not None else MIN_PIECE
        if self._workers > 1 and self._openvino is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="fastvae-onnx")

    def _check_graph_shapes(self, values: list[tuple[str, str, list[int | str | None]]]) -> None:
        """The graph's declared inputs and outputs, (name, type, shape), are float32 of the metadata's shapes,
        every size but the batch fixed: buffers are sized from the metadata, so a damaged size must fail here, not
        allocate or run."""
        sizes = {"images": self.image_shape, "reconstruction": self.image_shape}
        for name, kind, shape in values:
            expected = ("batch", *sizes.get(name, (self.z_dim,)))
            if kind != "tensor(float)" or len(shape) != len(expected) or list(shape[1:]) != list(expected[1:]):
                raise ValueError(f"{self.path}: the graph's {name} is {kind} {shape} but its metadata says float "
                                 f"{list(expected)}: the file is damaged or not a fastvae export")

    @functools.cached_property
    def _piece_session(self) -> ort.InferenceSession:
        """The single-threaded session the pieces run on, made by the first split batch: a caller with small
        batches never pays for loading the model twice."""
        return make_session(self.path, "cpu", threads=1)

    @property
    def provider(self) -> str:
        """The execution provider running the graph, e.g. 'CPUExecutionProvider'; 'OpenVINO CPU' for OpenVINO."""
        return "OpenVINO CPU" if self._openvino is not None else self.session.get_providers()[0]

    def _require(self, parts: tuple[str, ...], method: str) -> None:
        if self.part not in parts:
            raise ValueError(
                f"{method}() needs a file exported with --part {' or --part '.join(parts)}, but {self.path} "
                f"holds the {self.part!r} part; write one with `fastvae export --part {parts[0]}`"
            )

    def _run(self, feeds: dict[str, np.ndarray], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        """Run with IO binding: inputs are read from the numpy buffers, outputs written into fresh numpy
        buffers, so no extra host copy is made (on CUDA: one copy in, one copy out). Every input and output
        has the batch first, so a piece of the batch is a contiguous slice of each."""
        outputs = [np.empty(shape, dtype=np.float32) for shape in shapes]
        pieces = batch_pieces(shapes[0][0], self._workers, self._min_piece)
        if self._openvino is not None:
            self._openvino.run(feeds, dict(zip(OUTPUTS[self.part], outputs, strict=True)), pieces)
        elif len(pieces) == 1:
            self._run_piece(self.session, feeds, outputs, *pieces[0])
        else:
            session = self._piece_session  # made here, once, before the threads use it
            # onnxruntime releases the GIL while it runs, so the pieces run on all cores at once.
            list(self._pool.map(lambda piece: self._run_piece(session, feeds, outputs, *piece), pieces))
        # A checkpoint with a NaN weight, or a damaged file, gives NaN images that would save as black PNGs.
        if not all(np.isfinite(out).all() for out in outputs):
            raise ValueError(f"{self.path} produced NaN or infinite values: the model's weights are broken; "
                             "export it again from a good checkpoint")
        return outputs

    def _run_piece(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], outputs: list[np.ndarray],
                   start: int, stop: int) -> None:
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array[start:stop])
        for name, out in zip(OUTPUTS[self.part], outputs, strict=True):
            piece = out[start:stop]
            binding.bind_output(name, "cpu", 0, np.float32, piece.shape, piece.ctypes.data)
        try:
            session.run_with_iobinding(binding, self._run_options)
        except Exception as e:  # onnxruntime raises RuntimeError and its own types for a graph that cannot run
            raise ValueError(f"{self.path} could not be run by onnxruntime (damaged or not a fastvae export): "
                             f"{_one_line(e)}") from e

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Latents (B, Z) -> images (B, C, 28, 28) float32 in [0, 1]. Needs a decoder export.

        Float arrays of any precision are converted to float32; integer, bool and other dtypes raise ValueError.
        """
        self._require(("decoder",), "decode")
        z = _check_array(z, "z", (None, self.z_dim), unit=False)
        return self._run({"z": z}, [(len(z), *self.image_shape)])[0]

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        """n images (n, C, 28, 28) from z ~ N(0, I) drawn by numpy's Generator(seed). Needs a decoder export."""
        self._require(("decoder",), "sample")
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        z = np.random.default_rng(seed).standard_normal((n, self.z_dim), dtype=np.float32)
        return self.decode(z)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, C, 28, 28) in [0, 1] -> q(z|x)'s mean and log sigma, each (B, Z) float32.

        Works on an encoder export, or a vae export (run with eps = 0; its reconstruction is discarded).
        Float arrays of any precision are converted to float32; integer, bool and other dtypes raise ValueError.
        """
        self._require(("encoder", "vae"), "encode")
        images = _check_array(images, "images", (None, *self.image_shape), unit=True)
        latent = (len(images), self.z_dim)
        if self.part == "encoder":
            mean, log_sigma = self._run({"images": images}, [latent, latent])
        else:
            eps = np.zeros(latent, dtype=np.float32)
            _, mean, log_sigma = self._run({"images": images, "eps": eps}, [images.shape, latent, latent])
        return mean, log_sigma

    def reconstruct(self, images: np.ndarray, seed: int | None = None) -> np.ndarray:
        """Images (B, C, 28, 28) in [0, 1] -> reconstructions, same shape, decoded from z = mean + sigma * eps
        with eps ~ N(0, I) from numpy's Generator(seed). Needs a vae export.

        Float arrays of any precision are converted to float32; integer, bool and other dtypes raise ValueError.
        """
        self._require(("vae",), "reconstruct")
        images = _check_array(images, "images", (None, *self.image_shape), unit=True)
        latent = (len(images), self.z_dim)
        eps = np.random.default_rng(seed).standard_normal(latent, dtype=np.float32)
        return self._run({"images": images, "eps": eps}, [images.shape, latent, latent])[0]
