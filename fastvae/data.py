"""Datasets as whole uint8 tensors (N, 1, 28, 28) read from IDX files, and batches drawn by shuffled index."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fastvae.config import DATASETS
from fastvae.errors import FastVAEError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastvae"
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 32  # numpy 1's limit (numpy 2 allows 64); MNIST files have 1 or 3
_MAX_BYTES = 2**34  # 16 GiB, over 300 whole MNIST splits: a header asking more is corrupt, not data
_CHUNK = 1 << 20  # inflate this much per call at most, so the peak is the output plus one chunk


class _Gunzip:
    """Inflate gzip data on demand and never past the bytes asked for, which the IDX header bounds.

    Concatenated members read as one stream, as RFC 1952 and gzip(1) have it (`cat a.gz b.gz` is valid gzip).
    Any other bytes after the last member, zero padding included, are refused although Python's gzip skips
    zeros: a file that is not exactly what it claims is flagged, as a plain IDX file with extra bytes is.
    """

    def __init__(self, raw: bytes, path: Path) -> None:
        self.out = bytearray()
        self._path = path
        self._inflater = zlib.decompressobj(wbits=31)  # 16 + 15: gzip wrapper only; zlib checks CRC-32 and length
        self._input = raw

    def fill(self, n: int) -> bytearray:
        """Inflate until at least n bytes are out or the data ends, and return all bytes out so far."""
        while len(self.out) < n:
            if self._inflater.eof:
                rest = self._inflater.unused_data
                if not rest:
                    break
                if rest[:2] != _GZIP_MAGIC:
                    raise FastVAEError(
                        f"cannot read IDX file {self._path}: {len(rest)} stray bytes after the gzip data; "
                        "download the file again"
                    )
                self._inflater = zlib.decompressobj(wbits=31)
                self._input = rest
            try:
                chunk = self._inflater.decompress(self._input, min(n - len(self.out), _CHUNK))
            except zlib.error as e:
                raise FastVAEError(
                    f"cannot read IDX file {self._path}: corrupt gzip data ({e}); download the file again"
                ) from e
            self._input = self._inflater.unconsumed_tail
            # All input taken, nothing out and the member unfinished: the file was cut short.
            if not chunk and not self._input and not self._inflater.eof:
                raise FastVAEError(
                    f"cannot read IDX file {self._path}: the gzip data ends early; download the file again"
                )
            self.out += chunk
        return self.out


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzip) of unsigned bytes into an array of the shape its header gives.

    gzip data is inflated no further than the header says it holds, and a header over _MAX_BYTES is refused,
    so neither a corrupt header nor a gzip bomb can make the reader allocate more than the file justifies.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FastVAEError(f"cannot read IDX file {path}: {e}") from e
    gzipped = raw[:2] == _GZIP_MAGIC
    fill = _Gunzip(raw, path).fill if gzipped else lambda n: raw
    data = fill(4)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise FastVAEError(f"{path} is not an IDX file (bad magic number); expected MNIST-format data")
    if data[2] != _UBYTE:
        raise FastVAEError(f"{path}: IDX type code 0x{data[2]:02x} is not supported; expected unsigned bytes")
    ndim = data[3]
    if not 1 <= ndim <= _MAX_NDIM:
        raise FastVAEError(
            f"{path}: IDX header gives {ndim} dimensions, expected 1 to {_MAX_NDIM}; the header is corrupt"
        )
    header = 4 + 4 * ndim
    data = fill(header)
    if len(data) < header:
        raise FastVAEError(f"{path} is truncated: the header is incomplete")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    # Python ints, as np.prod wraps in int64 (65536**4 gives 0). Zero dims count as 1 here because numpy
    # refuses even an empty shape like (0, 2**32 - 1, 2**32 - 1, 2**32 - 1) whose other dims overflow.
    if math.prod(max(d, 1) for d in shape) > _MAX_BYTES:
        raise FastVAEError(
            f"{path}: IDX header gives shape {shape}, over the {_MAX_BYTES}-byte limit; the header is corrupt"
        )
    expected = math.prod(shape)
    data = fill(header + expected + 1)  # one byte more than the header says, to see that the data ends there
    if len(data) - header != expected:
        found = f"more than {expected}" if gzipped and len(data) > header + expected else len(data) - header
        raise FastVAEError(
            f"{path} is truncated or corrupt: header says {shape} = {expected} bytes, "
            f"found {found}; download the file again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, gzip-compressed when the name ends in .gz (used by tests)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(payload) if str(path).endswith(".gz") else payload)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _missing_message(name: str, directory: Path, stem: str) -> str:
    if name == "fashion-mnist" and directory == FASHION_MNIST_DIR:
        fix = "install it with `sudo apt-get install -y dataset-fashion-mnist`, or pass --data-dir DIR"
    else:
        fix = "put the four MNIST-format IDX files there, or pass --data-dir DIR that holds them"
    return f"{name}: {stem}[.gz] not found in {directory}: {fix}"


def _mnist_download_dir() -> Path:
    """Fetch MNIST with torchvision into the user cache; return the folder holding its IDX files."""
    from torchvision.datasets import MNIST

    root = MNIST_CACHE_DIR
    try:
        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)
    except Exception as e:  # torchvision raises several types for network and checksum failures
        raise FastVAEError(
            f"mnist: download failed ({type(e).__name__}: {e}); without a network, get the four MNIST IDX "
            "files (train-images-idx3-ubyte.gz, ...) and pass --data-dir DIR"
        ) from e
    return root / "MNIST" / "raw"


def load_images(name: str, split: str, data_dir: str | Path | None = None) -> torch.Tensor:
    """The images of one split as a uint8 tensor (N, 1, H, W). `split` is 'train' or 'test'."""
    if name not in DATASETS:
        raise FastVAEError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if data_dir is not None:
        directory = Path(data_dir)
        if not directory.is_dir():
            raise FastVAEError(f"--data-dir {directory} is not a folder")
    elif name == "fashion-mnist":
        directory = FASHION_MNIST_DIR
    else:
        directory = _mnist_download_dir()
    stem = f"{_SPLIT_PREFIX[split]}-images-idx3-ubyte"
    path = _find_idx(directory, stem)
    if path is None:
        raise FastVAEError(_missing_message(name, directory, stem))
    images = read_idx(path)
    if images.ndim != 3:
        raise FastVAEError(f"{path}: expected images of shape (N, H, W), found {images.shape}")
    return torch.from_numpy(images.copy()).unsqueeze(1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1], as torchvision's ToTensor gives them."""
    return images.float().div_(255.0)


def shuffled_batches(
    images: torch.Tensor, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """Float batches (batch_size // world_size, C, H, W) of one shuffled pass over `images` (on its device):
    rank `rank`'s consecutive slice of each global batch of `batch_size` (which world_size divides).

    The batches are indexed out of `images` where it lies: a whole split of (Fashion-)MNIST is 47 MB, so it lives on
    the training device and no per-sample Python or worker process stands between the data and the model.
    Every rank draws the same permutation from an equally seeded `generator`, so the ranks' slices are
    disjoint and together are the single-process batch. The last partial batch is dropped so every step has
    the same shape (one compiled graph); the shuffle differs every epoch, so no image is left out for long.
    """
    order = torch.randperm(len(images), generator=generator).to(images.device)
    local = batch_size // world_size
    for start in range(0, len(images) - batch_size + 1, batch_size):
        first = start + rank * local
        yield to_float(images[order[first : first + local]])


def ordered_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Float batches over `images` in order, the last one partial (for evaluation)."""
    for start in range(0, len(images), batch_size):
        yield to_float(images[start : start + batch_size])
