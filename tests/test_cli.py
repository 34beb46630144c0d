"""Bad input: one clear line, a non-zero exit, no traceback, and nothing already on disk lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from fastvae.cli import main
from tests.helpers import folder_snapshot


@pytest.fixture(scope="module")
def trained_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data-dir", str(tiny_data_dir), "--batch-size", "32", "--limit-train", "64",
                 "--epochs", "1", "--z-dim", "8", "--out", str(out), "--no-progress"]) == 0
    return out


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys, "not found", "--data-dir")


def test_corrupt_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage" * 10)
    _fails(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys, "not an IDX file")


def test_batch_size_zero(tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["train", "--data-dir", str(tiny_data_dir), "--batch-size", "0", "--out", str(tmp_path / "o")],
           capsys, "--batch-size must be at least 1")


def test_batch_larger_than_data(tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["train", "--data-dir", str(tiny_data_dir), "--batch-size", "1024", "--out", str(tmp_path / "o")],
           capsys, "larger than the training set")


def test_unwritable_output(tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    _fails(["train", "--data-dir", str(tiny_data_dir), "--out", str(blocker / "run")], capsys,
           "cannot write to output folder")
    assert blocker.read_text() == "keep me"


def test_existing_run_is_not_overwritten(trained_run: Path, tiny_data_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    before = folder_snapshot(trained_run)
    _fails(["train", "--data-dir", str(tiny_data_dir), "--out", str(trained_run)], capsys, "--resume")
    assert folder_snapshot(trained_run) == before


def test_z_dim_disagreeing_with_checkpoint(trained_run: Path, tiny_data_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = folder_snapshot(trained_run)
    _fails(["train", "--resume", "--z-dim", "16", "--epochs", "2", "--data-dir", str(tiny_data_dir),
            "--out", str(trained_run)], capsys, "--z-dim 16 disagrees", "z_dim 8")
    _fails(["train", "--resume", "--seed", "99", "--epochs", "2", "--data-dir", str(tiny_data_dir),
            "--out", str(trained_run)], capsys, "--seed 99 disagrees")
    assert folder_snapshot(trained_run) == before


def test_resume_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["train", "--resume", "--out", str(tmp_path)], capsys, "nothing to resume")


def test_eval_corrupt_checkpoint(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((trained_run / "epoch-1" / "model.safetensors").read_bytes()[:5000])
    _fails(["eval", str(broken)], capsys, "corrupt")


def test_eval_foreign_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    _fails(["eval", str(tmp_path / "model.safetensors")], capsys, "not a fastvae checkpoint")


def test_eval_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["eval", str(tmp_path / "nothing")], capsys, "no checkpoint")


def test_eval_reports_both_bounds(trained_run: Path, tiny_data_dir: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(trained_run), "--data-dir", str(tiny_data_dir), "--k", "8", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "negative ELBO" in out and "IWAE bound (k=8)" in out and "nats/image" in out


def test_unknown_dataset_exits_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "fastvae", "train", "--data", "cifar", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice: 'cifar'" in result.stderr and "Traceback" not in result.stderr
