"""Samples in bulk: any number of them decoded in chunks into one .npy file, so memory stays bounded; and the
most images a PNG grid may hold. Torch-free, like the runtime it drives."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fastvae.errors import FastVAEError

if TYPE_CHECKING:
    from fastvae.runtime import OnnxVAE

# A 64x64 grid, 1922x1922 px for 28x28 images. NOTE: `sample --n 1000000` as one grid ran 3 minutes, peaked at
# 13.7 GB and wrote a 30,000x30,000 PNG that PIL refuses to open.
MAX_GRID_IMAGES = 4096
# Images decoded at a time into a .npy file: 12.8 MB of float32 output at 1x28x28.
SAMPLE_CHUNK = 4096
_HEADER_BYTES = 128  # a .npy header for shapes like ours (the format pads it to a multiple of 64)


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) ranges of at most `size` covering range(n), of near-equal lengths: no one-image tail, which
    onnxruntime decodes with another kernel (a last-bit difference from the whole batch, measured 3e-8)."""
    count = -(-n // size)
    step = -(-n // count)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def write_samples_npy(path: str | Path, vae: OnnxVAE, n: int, seed: int | None) -> None:
    """Write `n` samples of the decoder export `vae` to the .npy file `path` as one float32 array (n, C, H, W):
    the images of vae.sample(n, seed), decoded SAMPLE_CHUNK at a time and streamed to a temp file that replaces
    `path` only when complete, so memory stays bounded for any n and no partial file is ever visible.

    Raises FastVAEError when the disk has no room for the array, ValueError from the runtime, OSError on writing.
    """
    # Imported here: the CLI's parser reads MAX_GRID_IMAGES, and `fastvae --help` should not wait for numpy.
    import numpy as np

    from fastvae.files import atomic_write

    path = Path(path)
    shape = (n, *vae.image_shape)
    need = _HEADER_BYTES + 4 * math.prod(shape)
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise FastVAEError(f"{n} samples need {need / 1e9:.3g} GB as float32 but {path.parent} has "
                           f"{free / 1e9:.3g} GB free; ask for fewer with --n")
    # The same draws as vae.sample(n, seed): a Generator's normals come in order however many are drawn at once.
    rng = np.random.default_rng(seed)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape}

    def write(f: BinaryIO) -> None:
        np.lib.format.write_array_header_1_0(f, header)
        for start, stop in chunks(n, SAMPLE_CHUNK):
            z = rng.standard_normal((stop - start, vae.z_dim), dtype=np.float32)  # (b, Z)
            f.write(vae.decode(z).astype("<f4", copy=False).data)  # (b, C, H, W), C order

    atomic_write(path, write)
