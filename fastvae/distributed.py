"""Training on several processes or machines under torchrun: NCCL on CUDA, Gloo on CPU, DistributedDataParallel."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastvae.config import TrainConfig
from fastvae.errors import FastVAEError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch; the defaults describe a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, evaluates and writes the run folder."""
        return self.rank == 0


def from_env(environ: Mapping[str, str] = os.environ) -> Launch:
    """torchrun gives each worker RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process."""
    present = [name for name in _ENV if name in environ]
    if not present:
        return Launch()
    if len(present) < len(_ENV):
        missing = ", ".join(name for name in _ENV if name not in environ)
        raise FastVAEError(f"{', '.join(present)} set but {missing} not: launch several processes with torchrun")
    try:
        rank, world_size, local_rank = (int(environ[name]) for name in _ENV)
    except ValueError as e:
        raise FastVAEError(f"torchrun's RANK, WORLD_SIZE or LOCAL_RANK is not an integer ({e})") from e
    if not 0 <= rank < world_size or local_rank < 0:
        raise FastVAEError(f"RANK {rank}, WORLD_SIZE {world_size}, LOCAL_RANK {local_rank} are inconsistent")
    return Launch(rank, world_size, local_rank, distributed=True)


def rank_device(device: torch.device, launch: Launch) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK for a CUDA run under torchrun; `device` otherwise."""
    if device.type != "cuda" or not launch.distributed:
        return device
    if launch.local_rank >= torch.cuda.device_count():
        raise FastVAEError(f"LOCAL_RANK {launch.local_rank} but {torch.cuda.device_count()} GPUs are visible: "
                           "start at most one process per GPU (--nproc_per_node)")
    return torch.device("cuda", launch.local_rank)


def check_options(config: TrainConfig, launch: Launch, device: torch.device) -> None:
    """Refuse what cannot work, before any process waits on another."""
    if config.batch_size % launch.world_size:
        raise FastVAEError(
            f"--batch-size {config.batch_size} is the global batch: it must divide evenly over the "
            f"{launch.world_size} processes; use a multiple of {launch.world_size}"
        )
    if config.sync_bn and not launch.distributed:
        raise FastVAEError("--sync-bn synchronizes BatchNorm across torchrun's processes: launch with torchrun")
    if config.sync_bn and device.type != "cuda":
        raise FastVAEError("--sync-bn needs CUDA: nn.SyncBatchNorm refuses CPU modules; on the CPU each "
                           "process normalizes over its own shard (drop --sync-bn)")


@contextmanager
def process_group(launch: Launch, device: torch.device, timeout_s: float) -> Iterator[None]:
    """The default process group for the body (nothing without torchrun). `timeout_s` bounds both the wait for
    the other processes at start and every collective, so a lost or stalled peer ends the run, not hangs it."""
    if not launch.distributed:
        yield
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    except RuntimeError as e:  # DistStoreError and DistNetworkError are RuntimeErrors
        raise FastVAEError(f"process {launch.rank} could not join the other {launch.world_size - 1} within "
                           f"--dist-timeout {timeout_s:g} s: {_first_line(e)}") from e
    try:
        yield
    except RuntimeError as e:
        # Gloo reports a lost or stalled peer as a plain RuntimeError, NCCL as DistBackendError (a subclass).
        raise FastVAEError(
            f"process {launch.rank} of {launch.world_size} stopped: {_first_line(e)}. If another process failed, "
            f"was lost or stalled past --dist-timeout {timeout_s:g} s, its log says why; the last checkpoint "
            "written is intact"
        ) from e
    # Torn down on success only: after a failure the process exits, and a broken group's teardown can block.
    dist.destroy_process_group()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def wrap(model: torch.nn.Module, device: torch.device, compile_mode: str | None, fullgraph: bool,
         sync_bn: bool) -> torch.nn.Module:
    """`model` (already on `device`) for the training step: DDP around it, compiled inside the wrapper with
    torch.compile's `compile_mode` (None: not compiled).

    torch.compile cannot trace DDP's forward (with fullgraph=True: "Unsupported method call"), so the
    model is compiled and DDP wraps it, as PyTorch's "where to apply torch.compile" advises. SyncBatchNorm
    breaks the graph (pytorch/pytorch#161302), so with --sync-bn the plan compiles without fullgraph.
    """
    # Without --sync-bn each process normalizes over its own shard, DDP's default: nn.SyncBatchNorm adds two
    # collectives per BatchNorm layer per step (forward and backward) and, in torch 2.14, refuses CPU modules and
    # breaks torch.compile's graph (pytorch/pytorch#156680). The running statistics need no such sync: DDP
    # broadcasts rank 0's buffers before each forward.
    if sync_bn:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place: the same parameters and buffers
    # NOTE: the decoder's last weight (64, 1, 4, 4) gets a channels_last gradient, strides (16, 1, 4, 1)
    # against the parameter's (16, 16, 4, 1): they differ only on the size-1 dim, the same memory layout, so
    # DDP's "may impair performance" warning does not apply.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    inner = model if compile_mode is None else torch.compile(model, mode=compile_mode, fullgraph=fullgraph)
    return DistributedDataParallel(inner, device_ids=[device.index] if device.type == "cuda" else None)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes, in a new tensor (in place would change the caller's loss
    behind autograd's back); `tensor` itself in a single process. Every step's loss is summed this way, so rank 0
    reports the global loss and a non-finite one stops every process at the same step."""
    if not dist.is_initialized():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
