"""fastvae.malloc: the glibc setting that keeps freed memory, applied in a child process."""

from __future__ import annotations

import subprocess
import sys


def test_keep_freed_memory_reports_what_it_did() -> None:
    # In a child: the setting is process-wide and this test process should keep glibc's defaults.
    code = "from fastvae.malloc import keep_freed_memory; print(keep_freed_memory())"
    line = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert line == "None" if sys.platform.startswith("linux") else line == "not glibc: nothing to tune", line
