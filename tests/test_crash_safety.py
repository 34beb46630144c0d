"""A SIGKILL at any step of a save leaves a run folder that resumes to the uninterrupted run's weights, bit for bit;
run folders of the first layout (files beside run.json) still load and resume."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from fastvae.checkpoint import load_weights
from fastvae.cli import main
from fastvae.run_folder import CRASH_ENV, OPTIMIZER, RECORD, WEIGHTS

ARGS = ["--batch-size", "32", "--limit-train", "64", "--z-dim", "4", "--seed", "7", "--no-progress"]
EPOCHS = 3
# More crash points than a save has: the loop below stops at the first run that is not killed.
MAX_POINTS = 20


def _train_with_crash_point(argv: list[str], crash: str) -> None:
    os.environ[CRASH_ENV] = crash
    raise SystemExit(main(argv))


@pytest.fixture(scope="module")
def processes() -> multiprocessing.context.BaseContext:
    """Fresh processes forked from a server that has imported torch once: each killed run then costs its training
    alone, not a torch import (a forked child of this process could hang in OpenMP, which this one has used)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fastvae.train", "fastvae.cli"])
    return context


def _argv(data_dir: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(data_dir), "--out", str(out), "--epochs", str(epochs), *ARGS, *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(_argv(tiny_data_dir, out, EPOCHS)) == 0
    return load_weights(out)[1]


def _finish(data_dir: Path, out: Path) -> None:
    """Carry a killed run on to EPOCHS: resume its last complete checkpoint, or start again if it has none."""
    resume = ["--resume"] if (out / RECORD).exists() else []
    assert main(_argv(data_dir, out, EPOCHS, *resume)) == 0


def _assert_same_weights(out: Path, expected: dict[str, torch.Tensor]) -> None:
    config, state, epoch = load_weights(out)
    assert epoch == EPOCHS
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [1, 2], ids=["first-save", "second-save"])
def test_sigkill_at_every_step_of_a_save(epoch: int, tiny_data_dir: Path, tmp_path: Path,
                                         uninterrupted: dict[str, torch.Tensor],
                                         processes: multiprocessing.context.BaseContext) -> None:
    """A real `fastvae train` process is killed at crash point 1, 2, ... of epoch `epoch`'s save (through the
    test-only FASTVAE_TEST_CRASH hook), until a run gets through the whole save; every killed folder must then
    carry on to the uninterrupted run's weights."""
    killed = 0
    for point in range(1, MAX_POINTS + 1):
        out = tmp_path / f"point-{point}"
        child = processes.Process(target=_train_with_crash_point,
                                  args=(_argv(tiny_data_dir, out, epoch), f"{epoch}:{point}"))
        child.start()
        child.join(timeout=300)
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL, f"crash point {point}: exit code {child.exitcode}"
        killed += 1
        _finish(tiny_data_dir, out)
        _assert_same_weights(out, uninterrupted)
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "leftovers of the killed save"
    else:
        pytest.fail(f"every one of {MAX_POINTS} runs was killed: the save has more crash points than the test")
    assert killed >= 6, f"only {killed} crash points in a save"


def test_first_layout_loads_and_resumes(tiny_data_dir: Path, tmp_path: Path,
                                        uninterrupted: dict[str, torch.Tensor],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Run folders written before checkpoint folders and run plans existed: the weights beside run.json, and the
    device, kernel and precision as keys of their own."""
    out = tmp_path / "run"
    assert main(_argv(tiny_data_dir, out, 1)) == 0
    record = json.loads((out / RECORD).read_text())
    for name in (WEIGHTS, OPTIMIZER):
        shutil.move(out / record["checkpoint"] / name, out / name)
    (out / record["checkpoint"]).rmdir()
    del record["checkpoint"]
    plan = record.pop("plan")
    record.update(device=plan["device"], world_size=1, amp_dtype=None, kernel=plan["kernel"],
                  kernel_reason=plan["reasons"]["kernel"])
    (out / RECORD).write_text(json.dumps(record))
    assert main(["eval", str(out), "--data-dir", str(tiny_data_dir), "--k", "2", "--limit", "4"]) == 0
    assert "(epoch 1," in capsys.readouterr().out
    _finish(tiny_data_dir, out)
    _assert_same_weights(out, uninterrupted)
    assert not (out / WEIGHTS).exists() and not (out / OPTIMIZER).exists(), "the first layout's files stayed"
