"""Atomic file writes (temp file + rename) and PNG image grids; torch-free, so the ONNX runtime can use it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fastvae.errors import FastVAEError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temp file beside `path`, fsync it, rename it over `path` and fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make the renames inside folder `path` durable: without it a power loss can undo a finished rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove a file can be written in it, or raise a clear FastVAEError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise FastVAEError(f"cannot write to output folder {path}: {e.strerror}; choose another --out") from e
    return path


def image_grid(images: np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] -> one uint8 picture, (H', W') for C = 1 else (H', W', C), `nrow` images
    per row with white padding, laid out as torchvision's make_grid does."""
    n, channels, height, width = images.shape
    cols, rows = min(nrow, n), -(-n // nrow)
    grid = np.ones((channels, rows * (height + padding) + padding, cols * (width + padding) + padding), np.float32)
    for i, image in enumerate(images):
        row, col = divmod(i, nrow)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[:, top : top + height, left : left + width] = image
    pixels = np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)
    return pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)


def save_png(path: str | Path, images: np.ndarray, nrow: int) -> None:
    """Save images (N, C, H, W) float in [0, 1] as one PNG grid of `nrow` images per row, atomically."""
    from PIL import Image

    picture = Image.fromarray(image_grid(images, nrow))
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def check_output_file(path: str | Path, option: str) -> Path:
    """Prove, before any slow work, that the file `path` (given as `option`, e.g. "--out") can be written:
    missing parent folders are created; a directory, a file in the way of a folder, an unwritable folder or a
    read-only file raise a one-line FastVAEError. Leaves nothing behind but the folders it created."""
    path = Path(path)
    if path.is_dir():
        raise FastVAEError(f"cannot write {path} ({option}): it is a directory; give a file name, not a folder")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise FastVAEError(f"cannot write {path} ({option}): {blocker} is a file, not a folder; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastVAEError(f"cannot write {path} ({option}): cannot create the folder {path.parent} ({e.strerror}); "
                           "choose another path") from e
    try:
        # O_TMPFILE where the OS has it, else a file unlinked at once: nothing is left in the folder.
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise FastVAEError(f"cannot write {path} ({option}): the folder {path.parent} is not writable "
                           f"({e.strerror}); choose another path") from e
    if path.exists() and not os.access(path, os.W_OK):
        raise FastVAEError(f"cannot write {path} ({option}): the file exists and is read-only; choose another path "
                           "or make it writable")
    return path
