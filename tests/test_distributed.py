"""torchrun with 2 processes on the CPU (Gloo over loopback): the single-process run's function, rank 0 alone
writing, a resumable checkpoint, and a killed or stalled process ending the job instead of hanging it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fastvae import step as step_module
from fastvae.checkpoint import load_optimizer_state, load_weights
from fastvae.cli import main
from fastvae.data import shuffled_batches
from fastvae.model import VAE
from fastvae.run_folder import load_record
from tests.helpers import folder_snapshot, relative_error

WORLD = 2
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
# Global batch 16 (8 per process), 4 steps an epoch.
ARGS = ["--limit-train", "64", "--batch-size", "16", "--epochs", "2", "--z-dim", "8", "--seed", "5", "--no-progress"]
RUN_FILES = {"epoch-2/model.safetensors", "epoch-2/optimizer.pt", "run.json", "recon.png", "samples.png"}


def _torchrun(data_dir: Path, out: Path, *args: str) -> list[str]:
    return [*TORCHRUN, "-m", "fastvae", "train", "--data-dir", str(data_dir), "--out", str(out), *args]


def _env() -> dict[str, str]:
    # One thread per process, set rather than left to torchrun's default: the reference run below uses one
    # thread too, so both sides run the same kernels in the same reduction order.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_process_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(run folder, stdout) of a 2-epoch run on 2 processes."""
    out = tmp_path_factory.mktemp("dist") / "run"
    result = subprocess.run(_torchrun(tiny_data_dir, out, *ARGS, "--dist-timeout", "60"), env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


class PerShardVAE(VAE):
    """The fast model whose training forward runs each of WORLD consecutive slices of the batch on its own,
    as the processes do: BatchNorm normalizes per slice, and its running statistics are the first slice's
    (DDP broadcasts rank 0's buffers before each forward, and rank 0 writes the checkpoint)."""

    def forward(self, images: torch.Tensor, eps: torch.Tensor | None = None,
                seed_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if not self.training:
            return super().forward(images, eps, seed_offset)
        kept = dict(self.named_buffers())
        outputs = []
        for i, x in enumerate(images.chunk(WORLD)):
            if i == 1:  # later slices update copies (in place on the originals would break autograd's saved values)
                self._set_buffers({name: buffer.clone() for name, buffer in kept.items()})
            # rank i's eps: rows i * B/WORLD on of the global draw, so its counters start that many rows in
            shard_pair = seed_offset + torch.tensor([0, i * len(x) * self.z_dim])
            outputs.append(super().forward(x, seed_offset=shard_pair))
        self._set_buffers(kept)
        return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))

    def _set_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        for name, buffer in buffers.items():
            module, _, attribute = name.rpartition(".")
            setattr(self.get_submodule(module), attribute, buffer)


@pytest.mark.slow
def test_two_processes_train_the_single_process_function(
    two_process_run: tuple[Path, str], tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the same 8 global batches of 16, the 2-process weights and Adam moments equal a 1-process run's,
    bit for bit.

    Without SyncBatchNorm (CPU) each process normalizes over its own 8 images, so the reference is the
    single-process trainer with PerShardVAE: the same global batch, eps and loss, BatchNorm per consecutive
    half. This tests the sharding (each rank's rows of the shared shuffle), the eps slicing, and gradient
    averaging with the world_size loss scale: Adam's weights are nearly blind to a gradient scale, its
    moments (exp_avg, exp_avg_sq) are not, so both are compared. Exactly, and it must be exact: the conv
    biases in front of BatchNorm have a zero gradient in exact arithmetic, so Adam turns any rounding
    difference into a +-lr step there (with 2 threads on one side: relative errors ~1). Both sides therefore
    run one thread. The logged train loss is a sum all-reduced across the processes, so it may differ in the
    last bits (NOTE: 3.9e-8 relative at epoch 1 on a 2-core AMD EPYC).
    """
    dist_out, _ = two_process_run
    reference = tmp_path / "reference"
    monkeypatch.setattr(step_module, "build_model", lambda plan, config: PerShardVAE(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data-dir", str(tiny_data_dir), "--out", str(reference), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)

    expected, actual = load_weights(reference)[1], load_weights(dist_out)[1]
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), (name, relative_error(actual[name], expected[name]))
    moments = [load_optimizer_state(d, 2)["optimizer"]["state"] for d in (reference, dist_out)]
    for index, state in moments[0].items():
        for name in ("exp_avg", "exp_avg_sq"):
            got = moments[1][index][name]
            assert torch.equal(got, state[name]), (index, name, relative_error(got, state[name]))
    epochs = [load_record(d)["epochs"] for d in (reference, dist_out)]
    for want, got in zip(*epochs, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)  # the all-reduced global loss
        assert got["test_neg_elbo"] == pytest.approx(want["test_neg_elbo"], rel=1e-5)


@pytest.mark.slow
def test_rank_zero_alone_logs_and_writes(two_process_run: tuple[Path, str]) -> None:
    out, stdout = two_process_run
    assert set(folder_snapshot(out)) == RUN_FILES, "duplicate or temp files"
    lines = stdout.splitlines()
    for prefix in ("plan:", "  kernel:", "epoch 1/2:", "epoch 2/2:", "wrote"):
        assert sum(line.startswith(prefix) for line in lines) == 1, stdout
    assert load_record(out)["plan"]["world_size"] == WORLD


@pytest.mark.slow  # both cases resume the folder of two_process_run's torchrun job
@pytest.mark.parametrize("processes", [1, 2])
def test_resumes_on_any_number_of_processes(
    processes: int, two_process_run: tuple[Path, str], tiny_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(two_process_run[0], out)
    args = ["--resume", "--epochs", "3", "--no-progress"]
    if processes == 1:
        assert main(["train", "--out", str(out), "--data-dir", str(tiny_data_dir), *args]) == 0
    else:  # every process reads the checkpoint
        result = subprocess.run(_torchrun(tiny_data_dir, out, *args), env=_env(), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = load_record(out)
    assert record["epochs_done"] == 3 and record["plan"]["world_size"] == processes
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.cuda
def test_one_process_on_nccl_trains_as_without_torchrun(tiny_data_dir: Path, tmp_path: Path) -> None:
    """torchrun with one process on a GPU: NCCL's process group and DDP around the model. Its losses are the
    plain run's (one process: DDP averages over one); not bit for bit, for cuDNN's backward convolutions may sum
    in another order from run to run."""
    single = [*TORCHRUN[:-1], "--nproc_per_node=1"]
    out = {"torchrun": tmp_path / "torchrun", "plain": tmp_path / "plain"}
    command = [*single, "-m", "fastvae", "train", "--data-dir", str(tiny_data_dir), "--out", str(out["torchrun"]),
               *ARGS, "--device", "cuda"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert main(["train", "--data-dir", str(tiny_data_dir), "--out", str(out["plain"]), *ARGS, "--device",
                 "cuda"]) == 0
    records = {name: load_record(folder) for name, folder in out.items()}
    assert records["torchrun"]["plan"]["distributed"] and records["torchrun"]["plan"]["world_size"] == 1
    assert records["torchrun"]["plan"]["device"] == "cuda:0"
    for got, want in zip(records["torchrun"]["epochs"], records["plain"]["epochs"], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)


# Rank 1's loss becomes NaN at its 7th step (epoch 2, step 3); rank 0's stays finite.
_POISON_RANK_1 = """
import os, sys
from fastvae import step
from fastvae.cli import main
real, calls = step.make_loss_fn, [0]
def poisoned(*args, **kwargs):
    loss_fn = real(*args, **kwargs)
    def loss(images, eps):
        calls[0] += 1
        value = loss_fn(images, eps)
        return value * float("nan") if calls[0] == 7 and os.environ["RANK"] == "1" else value
    return loss
step.make_loss_fn = poisoned
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_non_finite_loss_on_one_process_stops_all_alike(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [*TORCHRUN, "--no-python", sys.executable, "-c", _POISON_RANK_1, "train", "--data-dir",
               str(tiny_data_dir), "--out", str(out), *ARGS, "--epochs", "3"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastvae train: error:")]
    # Both processes see the all-reduced loss and stop at the same step with the same words.
    expected = "loss became NaN or infinite at epoch 2, step 3"
    assert len(errors) == WORLD and all(expected in e for e in errors), result.stderr
    _assert_checkpoint_intact(out)
    assert load_record(out)["epochs_done"] == 1


def test_rank_shards_are_disjoint_and_make_the_global_batch() -> None:
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    whole = list(shuffled_batches(images, 8, torch.Generator().manual_seed(3)))
    shards = [list(shuffled_batches(images, 8, torch.Generator().manual_seed(3), rank, 4)) for rank in range(4)]
    assert len(whole) == 5 and all(len(s) == 5 for s in shards)
    for step, batch in enumerate(whole):
        assert torch.equal(torch.cat([s[step] for s in shards]), batch)


def _pids_by_rank(parent: int) -> dict[int, int]:
    """torchrun's worker processes (children of `parent`) by their RANK, read from /proc."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The field after the command name (which may hold spaces, hence the last ')') is the parent pid.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        for item in environ:
            if item.startswith(b"RANK="):
                workers[int(item[5:])] = int(entry.name)
    return workers


@pytest.fixture
def long_run(tiny_data_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, dict[int, int]]]:
    """A 1000-epoch run on 2 processes, once its first checkpoint is complete: (torchrun, run folder, pids)."""
    out = tmp_path / "run"
    args = ["--limit-train", "256", "--batch-size", "16", "--epochs", "1000", "--z-dim", "8", "--no-progress",
            "--dist-timeout", "5"]
    proc = subprocess.Popen(_torchrun(tiny_data_dir, out, *args), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "samples.png").exists():  # written last in an epoch's save
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint from the run"
            time.sleep(0.05)
        pids = _pids_by_rank(proc.pid)
        assert sorted(pids) == [0, 1], pids
        yield proc, out, pids
    finally:  # torchrun's workers run in their own sessions: end any left (ours: children of this torchrun)
        for pid in _pids_by_rank(proc.pid).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()


def _ends_within(proc: subprocess.Popen[str], seconds: float) -> tuple[int, str, float]:
    start = time.monotonic()
    output, _ = proc.communicate(timeout=seconds)
    return proc.returncode, output, time.monotonic() - start


def _assert_checkpoint_intact(out: Path) -> None:
    epochs_done = load_record(out)["epochs_done"]
    assert 1 <= epochs_done < 1000 and load_weights(out)[2] == epochs_done
    load_optimizer_state(out, epochs_done)  # raises if optimizer.pt belongs to another epoch


@pytest.mark.slow
def test_killed_process_ends_the_job_and_keeps_the_checkpoint(long_run) -> None:
    proc, out, pids = long_run
    os.kill(pids[1], signal.SIGKILL)
    returncode, output, seconds = _ends_within(proc, 30)
    assert returncode != 0, output[-3000:]
    assert seconds < 10, f"{seconds:.1f} s"  # torchrun stops the others at once; --dist-timeout 5 bounds it anyway
    _assert_checkpoint_intact(out)


@pytest.mark.slow
def test_stalled_process_times_out_with_a_clear_error(long_run) -> None:
    """A stopped (not dead) peer keeps its sockets open: only the collective timeout (--dist-timeout 5) can end
    rank 0's wait."""
    proc, out, pids = long_run
    os.kill(pids[1], signal.SIGSTOP)
    start = time.monotonic()
    try:
        while pids[0] in _pids_by_rank(proc.pid).values():
            assert time.monotonic() - start < 30, "rank 0 still waits on the stopped process"
            time.sleep(0.1)
        waited = time.monotonic() - start
    finally:
        os.kill(pids[1], signal.SIGCONT)  # lets torchrun's SIGTERM reach it
    returncode, output, _ = _ends_within(proc, 30)
    assert returncode != 0 and 4 < waited < 15, f"{waited:.1f} s"
    errors = [line for line in output.splitlines() if line.startswith("fastvae train: error: process 0 of 2")]
    # Gloo words it "Timed out waiting 5000ms for recv ..." or "Application timeout caused pair closure".
    assert len(errors) == 1 and re.search("timed? ?out", errors[0], re.IGNORECASE), output[-3000:]
    _assert_checkpoint_intact(out)


@pytest.mark.parametrize("env, args, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["--batch-size", "15"], "multiple of 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["--sync-bn", "--device", "cpu"], "needs CUDA"),
    ({}, ["--sync-bn"], "launch with torchrun"),
    ({"WORLD_SIZE": "2"}, [], "RANK, LOCAL_RANK not"),
], ids=["indivisible-batch", "sync-bn-cpu", "sync-bn-alone", "partial-env"])
def test_refused_before_any_process_waits(
    env: dict[str, str], args: list[str], message: str, tiny_data_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()
