"""`make gpu-check`'s CPU mode: the same script as on a GPU, at tiny sizes, with the CUDA parts skipped and saying
so, so that the check cannot rot between the GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_check_cpu_mode(tiny_data_dir: Path, tmp_path: Path) -> None:
    """The command a GPU machine runs (bench/gpu_check.sh: its installs, then the check), in its CPU mode."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--out", str(out), "--data-dir", str(tiny_data_dir)],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "DEVICE": "cpu", "GPU_CHECK_PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]  # a lent machine returns few
    report = json.loads((out / "results.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"CUDA tests", "10-epoch run (--compile --amp)", "training step",
                             "reparameterize + KL (forward + backward)", "step profile (--compile --amp)",
                             "decoder inference", "targets"}, report["skipped"]
    assert not [name for name, section in sections.items() if "error" in section], sections
    assert "needs a CUDA GPU" in sections["CUDA tests"]["result"]["note"]
    assert sections["10-epoch run (--compile --amp)"]["result"]["exit_code"] == 0
    steps = sections["training step"]["result"]
    assert steps["fastvae-eager"]["images_per_s"] > 0 and "ratio_vs_lab" in steps["fastvae-eager"]
    assert "skipped" in steps["fastvae-compile-cuda-graph"]["note"]
    assert {row["status"] for row in sections["targets"]["result"].values()} == {"n/a: CPU mode"}
    assert "# fastvae GPU check" in (out / "results.md").read_text()
