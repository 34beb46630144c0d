"""Helpers shared by test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too), by path relative to it: equal snapshots, identical trees."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
