"""OpenVINO (CPU) as `OnnxVAE`'s second backend: compiles a fastvae ONNX file and runs batches, or pieces of them
at the same time on OpenVINO's streams. Imported only by `OnnxVAE(..., backend="openvino")`, which keeps the
checks on the caller's input.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openvino as ov

# fp32 everywhere: on CPUs with avx512_bf16 OpenVINO otherwise computes in bf16 (an untrained decoder's images
# came out 4e-4 off onnxruntime's in bf16, 1.2e-7 in f32; 2-core AMD EPYC).
_FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class OpenVINOModel:
    """A fastvae ONNX file compiled for OpenVINO's CPU plugin, with its dynamic batch and `threads` threads.

    A batch that runs whole is one request on all the threads. A batch split into pieces starts one request per
    piece on `streams` streams of one thread each, and waits for them all; the pieces of exactly `fixed_batch`
    images run on a compilation with that batch fixed. Each compilation is made on first use, except the first.

    NOTE: 2-core AMD EPYC, default decoder graph, batch 1024 in pieces of 64 on 2 streams: 73 ms with the batch
    fixed against 81 ms with it dynamic (medians of 40 interleaved rounds); as one request, 150 ms. Batch 1 took
    0.21-0.22 ms on 2 threads against 0.25 ms on a stream of one thread (two runs).
    """

    def __init__(self, path: str | Path, streams: int, threads: int, fixed_batch: int) -> None:
        self.path = Path(path)
        self._core = ov.Core()
        try:  # the ONNX frontend alone: read_model would try TensorFlow's next on a bad file, and log to stderr
            onnx = ov.frontend.FrontEndManager().load_by_framework("onnx")
            self._model = onnx.convert(onnx.load(str(self.path)))
        except Exception as e:  # OpenVINO raises RuntimeError and its own types for a file it cannot read
            raise ValueError(f"{self.path} is not a loadable ONNX model (corrupt, truncated or not ONNX): "
                             f"{_one_line(e)}") from e
        framework = self._model.get_rt_info()["framework"] if self._model.has_rt_info(["framework"]) else {}
        self.metadata = {key: value.astype(str) for key, value in framework.items()}  # ONNX's metadata_props
        self.inputs, self.outputs = ([(port.get_any_name(), _kind(port), _dims(port)) for port in ports]
                                     for ports in (self._model.inputs, self._model.outputs))
        self._streams, self._threads, self._fixed_batch = streams, threads, fixed_batch
        self._request = self._compile(self._model, streams=1).create_infer_request()  # whole batches
        self._queues: dict[bool, ov.AsyncInferQueue] = {}  # pieces, by whether their batch is fixed_batch
        self._lock = threading.Lock()  # the requests are shared: one run at a time

    def _compile(self, model: ov.Model, streams: int) -> ov.CompiledModel:
        config = {**_FP32, "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": self._threads}
        try:
            return self._core.compile_model(model, "CPU", config)
        except Exception as e:
            raise ValueError(f"{self.path} could not be compiled by OpenVINO: {_one_line(e)}") from e

    def _queue(self, fixed: bool) -> ov.AsyncInferQueue:
        """One request per stream on the dynamic-batch compilation, or on the fixed-batch one; made once."""
        if fixed not in self._queues:
            model = self._model
            if fixed:
                model = model.clone()
                model.reshape({port.get_any_name(): [self._fixed_batch, *_dims(port)[1:]] for port in model.inputs})
            self._queues[fixed] = ov.AsyncInferQueue(self._compile(model, self._streams), self._streams)
        return self._queues[fixed]

    def run(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray], pieces: list[tuple[int, int]]) -> None:
        """Fill `outputs` (name -> float32 buffer, batch first) from `feeds` (name -> C-contiguous float32, batch
        first), one request per (start, stop) piece of the batch. Raises ValueError if OpenVINO cannot run it."""
        with self._lock:
            try:
                if len(pieces) == 1:
                    self._request.infer(feeds, share_inputs=True)
                    _copy_out(self._request, outputs, *pieces[0])
                    return
                jobs = [(self._queue(stop - start == self._fixed_batch), start, stop) for start, stop in pieces]
                queues = list({id(queue): queue for queue, _, _ in jobs}.values())
                errors: list[Exception] = []

                def done(request: ov.InferRequest, piece: tuple[int, int]) -> None:
                    try:  # an exception escaping an OpenVINO callback aborts the process
                        _copy_out(request, outputs, *piece)
                    except Exception as e:  # re-raised below, after the wait
                        errors.append(e)

                for queue in queues:
                    queue.set_callback(done)
                for queue, start, stop in jobs:
                    # share_inputs: the requests read the caller's slices in place; they outlive the wait below.
                    queue.start_async({name: array[start:stop] for name, array in feeds.items()}, (start, stop),
                                      share_inputs=True)
                for queue in queues:
                    queue.wait_all()
                if errors:
                    raise errors[0]
            except Exception as e:  # OpenVINO raises RuntimeError for a graph that cannot run
                raise ValueError(f"{self.path} could not be run by OpenVINO (damaged or not a fastvae export): "
                                 f"{_one_line(e)}") from e


def _copy_out(request: ov.InferRequest, outputs: dict[str, np.ndarray], start: int, stop: int) -> None:
    for name, out in outputs.items():
        out[start:stop] = request.get_tensor(name).data


def _kind(port: ov.Output) -> str:
    """An input's or output's element type in onnxruntime's words ("tensor(float)"), which the runtime checks."""
    name = port.get_element_type().get_type_name()
    return "tensor(float)" if name == "f32" else f"tensor({name})"


def _dims(port: ov.Output) -> list[int | None]:
    """A port's shape, None for a dynamic dimension."""
    return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
