"""A run folder on disk, laid out so that a kill at any instant leaves its last complete checkpoint loadable.
Torch-free, so the command line can read and check a run before it imports torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from pydantic import StringConstraints, TypeAdapter, ValidationError

from fastvae.config import ModelConfig, RunPlan, TrainConfig
from fastvae.errors import FastVAEError
from fastvae.files import atomic_write, fsync_dir

# The layout: run.json, the run's record (configs, plan, per-epoch metrics) naming its checkpoint folder, replaced
# last; epoch-N/, model.safetensors and optimizer.pt of epoch N, renamed into place as a whole folder; and the
# trainer's recon.png and samples.png.
RECORD = "run.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
_CHECKPOINT = re.compile(r"epoch-[0-9]+")
# Test-only: FASTVAE_TEST_CRASH="EPOCH:N" sends this process SIGKILL at the N-th crash point of epoch EPOCH's
# save, so a test can land a real kill at every step of a save (tests/test_crash_safety.py).
CRASH_ENV = "FASTVAE_TEST_CRASH"


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    images_per_s: float
    first_step_s: float  # up to the epoch's first read: step 1, or a graph's warmup steps and its capture
    seconds: float
    test_neg_elbo: float
    first_steps: int = 1  # the steps first_step_s covers (records from before it was kept: 1)


@dataclass(frozen=True)
class RunRecord:
    """The schema of run.json; `checkpoint` None: the weights and optimizer state lie in the run folder itself."""

    model_config: ModelConfig
    train_config: TrainConfig
    plan: RunPlan
    epochs_done: int
    epochs: list[EpochMetrics] = field(default_factory=list)
    checkpoint: Annotated[str, StringConstraints(pattern=f"^{_CHECKPOINT.pattern}$")] | None = None

    def __post_init__(self) -> None:
        if self.epochs_done < 0:
            raise ValueError(f"epochs_done must be >= 0, got {self.epochs_done}")
        if self.checkpoint is not None and self.checkpoint != checkpoint_name(self.epochs_done):
            raise ValueError(f"checkpoint {self.checkpoint!r} is not the folder of epoch {self.epochs_done}")


_SCHEMA = TypeAdapter(RunRecord)


def new_record(model_config: ModelConfig, train_config: TrainConfig, plan: RunPlan,
               epochs_done: int = 0) -> dict[str, Any]:
    """A run record with no epoch metrics yet, as a dict (the form the trainer updates and run.json holds)."""
    return asdict(RunRecord(model_config, train_config, plan, epochs_done))


def _with_plan(data: Any) -> Any:
    """A record that holds its device, kernel and precision facts at the top level instead of a `plan`, with
    those facts as a plan."""
    try:
        if "plan" in data or "device" not in data:
            return data
        legacy = {k: data.pop(k) for k in ("device", "world_size", "amp_dtype", "kernel", "kernel_reason")}
        train = data["train_config"]
        fast = train.get("model", "fast") == "fast"
        data["plan"] = {
            "device": legacy["device"], "distributed": legacy["world_size"] > 1, "world_size": legacy["world_size"],
            "model": "fast" if fast else "reference", "layers": "matmul" if fast else None,
            "kernel": legacy["kernel"], "amp_dtype": legacy["amp_dtype"], "compile": train.get("compile", False),
            "compile_mode": "default" if train.get("compile") else None, "cuda_graph": False,
            "fullgraph": bool(train.get("compile")) and fast, "sync_bn": train.get("sync_bn", False),
            "cpu_allocator": train.get("cpu_allocator", "cached") if legacy["device"] == "cpu" else None,
            "reasons": {"kernel": legacy["kernel_reason"]},
        }
    except (KeyError, TypeError, AttributeError):
        pass  # not a record of that shape either: the schema names what is wrong
    return data


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch}"


def _first_error(e: ValidationError) -> str:
    error = e.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "the whole file"
    return f"{key}: {error['msg']}"


def record_json(record: dict[str, Any]) -> bytes:
    """`record` checked against the schema and serialized; a bug in the trainer fails here, before any write."""
    return _SCHEMA.dump_json(_SCHEMA.validate_json(json.dumps(record), strict=True), indent=2)


def parse_record(text: bytes | str, source: Path) -> dict[str, Any]:
    """run.json's text, validated as a whole: the record as plain dicts and lists, or a one-line FastVAEError
    naming the file and the first bad key."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FastVAEError(f"{source} is not a valid fastvae run record (invalid JSON: {e}); restore it or start "
                           "a new --out") from e
    try:
        return _SCHEMA.dump_python(_SCHEMA.validate_json(json.dumps(_with_plan(data)), strict=True))
    except ValidationError as e:
        problem = _first_error(e)
    except (ValueError, FastVAEError) as e:  # a config's own check (e.g. batch_size 0), or __post_init__'s
        problem = str(e).splitlines()[0]
    raise FastVAEError(f"{source} is not a valid fastvae run record ({problem}); restore it or start a new --out")


def load_record(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / RECORD
    try:
        text = path.read_bytes()
    except FileNotFoundError as e:
        raise FastVAEError(f"no {RECORD} in {out_dir}: nothing to resume; drop --resume to start") from e
    except OSError as e:
        raise FastVAEError(f"{path} is unreadable ({e.strerror}); check its permissions") from e
    return parse_record(text, path)


def checkpoint_dir(out_dir: str | Path, record: dict[str, Any]) -> Path:
    """The folder holding the weights and optimizer state that `record` (read from `out_dir`) names."""
    return Path(out_dir) / record["checkpoint"] if record["checkpoint"] else Path(out_dir)


# Options a resumed run must keep, so that it continues the same function and random streams.
FIXED_ON_RESUME = ("data", "test_fraction", "test_data", "skip_bad", "batch_size", "lr", "beta", "seed", "model",
                   "limit_train")


def configs_to_resume(out_dir: Path, given: dict[str, Any], z_dim: int | None) -> tuple[TrainConfig, ModelConfig]:
    """The configs of resuming the run in `out_dir` with the options `given` (TrainConfig field -> value) and
    --z-dim `z_dim`: the checkpoint's for what a resumed run keeps, refusing options that contradict them."""
    record = load_record(out_dir)
    saved, model_config = record["train_config"], ModelConfig(**record["model_config"])
    if z_dim is not None and z_dim != model_config.z_dim:
        raise FastVAEError(f"--z-dim {z_dim} disagrees with the checkpoint in {out_dir} (z_dim {model_config.z_dim})")
    if given.get("channels") not in (None, model_config.im_chan):
        raise FastVAEError(f"--channels {given['channels']} disagrees with the checkpoint in {out_dir} "
                           f"({model_config.im_chan} channels): a resumed run keeps its model")
    for name in FIXED_ON_RESUME:
        if name in given and given[name] != saved[name]:
            raise FastVAEError(
                f"--{name.replace('_', '-')} {given[name]} disagrees with the checkpoint in {out_dir} "
                f"({saved[name]}): a resumed run keeps it"
            )
    return TrainConfig(**{**{k: saved[k] for k in FIXED_ON_RESUME}, **given}), model_config


_crash_points: dict[int, int] = {}


def crash_point(epoch: int) -> None:
    """A step of epoch `epoch`'s save; see CRASH_ENV."""
    target = os.environ.get(CRASH_ENV)
    if target is None:
        return
    _crash_points[epoch] = _crash_points.get(epoch, 0) + 1
    if target == f"{epoch}:{_crash_points[epoch]}":
        os.kill(os.getpid(), signal.SIGKILL)


def _discard(path: Path) -> None:
    """Remove a folder so that it vanishes at once: a kill mid-removal leaves a hidden .trash folder."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _referenced(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / RECORD).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None


def commit_checkpoint(out_dir: Path, record: dict[str, Any], files: dict[str, Callable[[BinaryIO], None]]) -> str:
    """Write `files` as epoch `record['epochs_done']`'s checkpoint folder, then run.json naming it, then remove
    the older checkpoints; returns the new folder's name. Until run.json is replaced, the previous record and its
    folder are untouched, so a kill at any instant leaves one complete checkpoint (the new one or the previous)."""
    epoch = record["epochs_done"]
    name = checkpoint_name(epoch)
    text = record_json({**record, "checkpoint": name})
    staging, final = out_dir / f".{name}.tmp", out_dir / name
    shutil.rmtree(staging, ignore_errors=True)  # left by a kill in an earlier save
    staging.mkdir()
    for filename, write in files.items():
        atomic_write(staging / filename, write)
        crash_point(epoch)
    fsync_dir(staging)
    if final.exists():  # written by a save that a kill stopped before its run.json
        if _referenced(out_dir) == name:
            raise RuntimeError(f"{final} is the current checkpoint; saving epoch {epoch} twice is a bug")
        _discard(final)
        crash_point(epoch)
    os.replace(staging, final)
    fsync_dir(out_dir)
    crash_point(epoch)
    atomic_write(out_dir / RECORD, lambda f: f.write(text))
    crash_point(epoch)
    for path in out_dir.iterdir():
        if path.name.startswith((".trash-", ".epoch-")):  # left by a kill in an earlier save or removal
            shutil.rmtree(path, ignore_errors=True)
        elif path.name != name and _CHECKPOINT.fullmatch(path.name):
            _discard(path)
        elif path.name in (WEIGHTS, OPTIMIZER):  # files of a record without `checkpoint`, superseded by the new one
            path.unlink()
        else:
            continue
        crash_point(epoch)
    return name
