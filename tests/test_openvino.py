"""The OpenVINO backend's checks (tests/openvino_checks.py), run in a process of their own.

NOTE: with OpenVINO's compiled models alive in the pytest process, the trainer's SIGTERM test that follows
crashed it (segmentation fault, 2-core AMD EPYC, OpenVINO 2026.4.1, torch 2.14.1); fastvae itself never loads
OpenVINO in a training process, so the checks keep to a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_openvino_backend() -> None:
    pytest.importorskip("openvino", reason="openvino is not importable (pip install openvino)", exc_type=ImportError)
    checks = Path(__file__).with_name("openvino_checks.py")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"OpenVINO checks: {summary}")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary, summary
