"""Bad input: one clear line, a non-zero exit, no traceback, and nothing already on disk lost."""

from __future__ import annotations

import shutil
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
    assert "--data cifar: not a dataset" in result.stderr and "Traceback" not in result.stderr


def test_resume_with_nothing_to_do_says_so(trained_run: Path, tiny_data_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = folder_snapshot(trained_run)
    assert main(["train", "--resume", "--epochs", "1", "--out", str(trained_run), "--data-dir", str(tiny_data_dir),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "nothing was trained or written" in out and "wrote" not in out, out
    assert folder_snapshot(trained_run) == before


def test_resume_writes_missing_pictures(trained_run: Path, tiny_data_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A kill between a checkpoint and its pictures leaves them missing; a resume puts them back."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for name in ("recon.png", "samples.png"):
        (run / name).unlink()
    assert main(["train", "--resume", "--epochs", "1", "--out", str(run), "--data-dir", str(tiny_data_dir),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote the missing recon.png, samples.png" in out and "nothing was trained;" in out, out
    for name in ("recon.png", "samples.png"):
        assert (run / name).read_bytes() == (trained_run / name).read_bytes()


def test_a_failed_first_run_leaves_no_trace(tiny_data_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["train", "--data-dir", str(tiny_data_dir), "--batch-size", "1024", "--out", str(tmp_path / "a" / "b")],
           capsys, "larger than the training set")
    assert list(tmp_path.iterdir()) == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime
    import torch

    import fastvae

    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        out = capsys.readouterr().out
        for text in (f"fastvae {fastvae.__version__}", f"torch {torch.__version__}",
                     f"onnxruntime {onnxruntime.__version__}", "triton ", "device: "):
            assert text in out, out


@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "0"], ["train", "--batch-size", "0"], ["train", "--lr", "0"], ["train", "--z-dim", "0"],
    ["train", "--epochs", "x"], ["eval", "run", "--k", "0"], ["sample", "m.onnx", "--n", "0"], ["export"],
], ids=lambda argv: "-".join(argv))
def test_option_errors_answer_before_torch_loads(argv: list[str], tmp_path: Path) -> None:
    """A smoke check, not a benchmark: the limit is generous for a loaded 2-core machine."""
    code = ("import sys\nfrom fastvae.cli import main\ncode = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=3,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_serve_web_without_a_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["serve-web", str(tmp_path / "missing.onnx"), "--port", "0"], capsys, "missing.onnx")
