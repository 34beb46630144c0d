"""`make gpu-check`'s CPU mode: the same script as on a GPU, at tiny sizes, with the CUDA parts skipped and saying
so, so that the check cannot rot between the GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_check_cpu_mode(tiny_data_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(tmp_path),
                             "--data-dir", str(tiny_data_dir)], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
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
    assert "# fastvae GPU check" in (tmp_path / "results.md").read_text()
