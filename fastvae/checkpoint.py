"""Checkpoints: the model's weights (safetensors, model config in the metadata) and the optimizer state, saved
into a run folder's checkpoint folder (fastvae.run_folder) and read back, from a run folder or a weights file.
"""

from __future__ import annotations

import io
import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fastvae.config import ModelConfig, RunPlan
from fastvae.errors import FastVAEError
from fastvae.model import VAE
from fastvae.plan import cpu_plan
from fastvae.run_folder import OPTIMIZER, RECORD, WEIGHTS, checkpoint_dir, commit_checkpoint, load_record

FORMAT = "fastvae-1"


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (Ctrl-C, torchrun stopping a job) until the block ends, then deliver them.

    Python handlers, not a signal mask: torch's worker threads would take a masked process-wide signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed from the main thread
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received:
            signal.raise_signal(signum)


def save_checkpoint(
    out_dir: Path, model: torch.nn.Module, config: ModelConfig, record: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> str:
    """Write weights, optimizer state and the run record (a fastvae.run_folder.RunRecord as a dict) for the
    epoch `record['epochs_done']`; returns the checkpoint folder's name. The previous checkpoint stays loadable
    until this one is complete."""
    epoch = str(record["epochs_done"])
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "model_config": json.dumps(asdict(config)), "epoch": epoch}
    weights = save_safetensors(tensors, metadata=metadata)
    files = {
        WEIGHTS: lambda f: f.write(weights),
        OPTIMIZER: lambda f: torch.save({**optimizer_state, "epoch": epoch}, f),
    }
    # A kill cannot break the folder (see commit_checkpoint); deferring Ctrl-C and SIGTERM also lets a save
    # that has begun finish.
    with _interrupts_deferred():
        return commit_checkpoint(out_dir, record, files)


def _weights_path(path: Path) -> tuple[Path, int | None]:
    """The weights file of a run folder (its last complete checkpoint) or the file itself, and the epoch the
    run record says it holds (None for a bare file)."""
    if path.is_dir():
        if (path / RECORD).is_file():
            record = load_record(path)
            return checkpoint_dir(path, record) / WEIGHTS, record["epochs_done"]
        path = path / WEIGHTS
    if not path.is_file():
        raise FastVAEError(f"no checkpoint at {path}: pass a run folder written by `fastvae train`")
    return path, None


def load_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], int]:
    """Read a run folder or a model.safetensors: (model config, state dict, epochs trained)."""
    path, recorded_epoch = _weights_path(Path(path))
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FastVAEError(f"cannot read {path} ({e.strerror}); restore it or train again") from e
    try:
        state = load_safetensors(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise FastVAEError(f"{path} is corrupt or not a safetensors file ({e}); train again or restore it") from e
    if metadata.get("format") != FORMAT:
        raise FastVAEError(f"{path} is not a fastvae checkpoint (no '{FORMAT}' metadata)")
    try:
        config = ModelConfig(**json.loads(metadata["model_config"]))
        epoch = int(metadata["epoch"])
    except (KeyError, TypeError, ValueError, FastVAEError) as e:
        raise FastVAEError(f"{path} has unreadable fastvae metadata ({e})") from e
    if recorded_epoch is not None and epoch != recorded_epoch:
        raise FastVAEError(f"{path} holds epoch {epoch} but {RECORD} says {recorded_epoch}: the run folder was "
                           "changed by hand; restore it or start a new --out")
    return config, state, epoch


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load `state` into `model`, naming missing, unexpected or mis-shaped tensors on failure."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise FastVAEError(
            f"{source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatches {shapes[:3]}"
        )
    model.load_state_dict(state)


def load_model(path: str | Path, plan: RunPlan | None = None) -> tuple[VAE, int]:
    """The fast model with `plan`'s layers and kernel (default: fastvae.plan.cpu_plan()'s), on the CPU in training
    mode, holding a checkpoint's weights, and its epochs trained."""
    config, state, epoch = load_weights(path)
    plan = plan or cpu_plan()
    model = VAE(config, plan.layers or "matmul", plan.kernel)
    load_into(model, state, path)
    return model, epoch


def load_optimizer_state(out_dir: Path, epoch: int) -> dict[str, Any]:
    """The optimizer and gradient-scaler state saved with epoch `epoch`'s weights in run folder `out_dir`."""
    path = checkpoint_dir(out_dir, load_record(out_dir)) / OPTIMIZER
    try:
        # On the CPU first: a GPU run's state loads on a machine without one; Adam moves it to the parameters.
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FastVAEError(f"no {OPTIMIZER} in {path.parent}: cannot resume exactly") from e
    except Exception as e:  # torch.load raises many types for a damaged file
        raise FastVAEError(f"{path} is corrupt ({type(e).__name__}); cannot resume") from e
    if not isinstance(state, dict) or state.get("epoch") != str(epoch):
        raise FastVAEError(
            f"{path} does not belong to epoch {epoch}, the weights' epoch: "
            "the checkpoint is inconsistent; start a new --out"
        )
    return state
