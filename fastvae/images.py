"""Users' own images as one uint8 tensor (N, C, 28, 28), the form the trainer uses for MNIST: a folder of pictures
(decoded on every core, the result cached by file list) or a .npy/.npz array."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import zipfile
import zlib
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from fastvae.config import DATASETS, SUPPORTED_IMAGE_SIZE
from fastvae.data import MNIST_CACHE_DIR
from fastvae.errors import FastVAEError
from fastvae.files import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SIZE = SUPPORTED_IMAGE_SIZE

_CACHE_FORMAT = 2  # bump when the decoding changes, so old cache files are never read as new ones
# The formats IMAGE_SUFFIXES name: a misnamed file of another kind is refused, not handed to one of PIL's rarer
# decoders (EPS would run Ghostscript).
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")  # and every "I;16..." mode
# NOTE: a forked worker costs ~50 ms to start and stop (30 ms to fork a process that has imported torch, 20 ms to
# join: 2 workers 0.07 s, 4 workers 0.16 s on a 2-core AMD EPYC), what one process decodes ~300 images in. So a
# worker gets at least this many files, and a pool starts at twice this. On that machine, shared with other jobs,
# one process still beat two at 1,024 files (0.14 against 0.18 s) and came level by 8,192 (1.1 against 1.2 s).
POOL_FILES_PER_WORKER = 512
_CHUNK_FILES = (16, 512)  # files per pool task, at least and at most: ~4 tasks a worker balances the load
_ARRAY_BLOCK_BYTES = 64 << 20  # array data converted at a time: the peak is the output and a few times this
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_MISSING = "give a folder of images, a .npy/.npz array, or a dataset name (" + ", ".join(DATASETS) + ")"


def is_image_source(data: str) -> bool:
    """True when `data` names a folder or a .npy/.npz file (anything that is not a dataset name like 'mnist'):
    a folder called 'mnist' is reached as './mnist'."""
    return data not in DATASETS


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, 28, 28), C = the channels asked for (or the source's own), contiguous, CPU
    source_channels: int  # 1 when the source is grayscale, 3 when it is colour (what `channels=None` gives)
    skipped: int  # unreadable files skipped with skip_bad=True (0 otherwise)
    description: str  # one line for the log, e.g. "1,234 images from photos/ (colour, 3 channels; 2 skipped; cached)"


def load_image_source(path: str | Path, channels: int | None = None, *, skip_bad: bool = False,
                      cache_dir: Path | None = None, progress: bool = True, workers: int | None = None) -> ImageSet:
    """A folder of images (searched recursively, hidden entries skipped, sorted by relative path) or a .npy/.npz
    array (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or float in [0, 1], as uint8 (N, C, 28, 28): each image
    centre-cropped to a square and resized. `channels` 1 or 3 converts; None keeps the source's own.

    A folder's decoding is cached in `cache_dir`/images (default MNIST_CACHE_DIR); bad input raises FastVAEError.
    """
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise FastVAEError(f"channels must be 1 or 3 (or None for the source's own), got {channels!r}")
    if workers is not None and workers < 1:
        raise FastVAEError(f"workers must be at least 1, got {workers}")
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, channels, skip_bad, MNIST_CACHE_DIR if cache_dir is None else Path(cache_dir),
                            progress, workers or os.cpu_count() or 1)
    if not path.exists():
        raise FastVAEError(f"image source {path} does not exist: {_MISSING}")
    if path.suffix.lower() not in ARRAY_SUFFIXES:
        raise FastVAEError(f"image source {path} is not a folder or a .npy/.npz file: {_MISSING}")
    return _load_array(path, channels)


def _describe(count: int, source: str, source_channels: int, channels: int, notes: list[str]) -> str:
    kind = "colour" if source_channels == 3 else "grayscale"
    shown = f"{channels} channel{'s' if channels > 1 else ''}"
    if channels != source_channels:
        shown = f"converted to {shown}"
    return f"{count:,} images from {source} ({'; '.join([f'{kind}, {shown}', *notes])})"


def _convert_channels(pixels: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 (k, C, H, W) -> (k, channels, H, W): L -> RGB repeats; RGB -> L is PIL's convert("L"), ITU-R 601-2
    luma R * 299/1000 + G * 587/1000 + B * 114/1000 in its 16-bit fixed point, so both give the same bytes."""
    if channels is None or channels == pixels.shape[1]:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=1)
    r, g, b = (pixels[:, i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]


def convert_channels(pixels: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 images (N, C, H, W) with `channels` channels (None: as they are), contiguous: _convert_channels
    over a whole set a block at a time, so the uint32 temporaries stay small."""
    if channels is None or channels == pixels.shape[1]:
        return np.ascontiguousarray(pixels)
    out = np.empty((len(pixels), channels, *pixels.shape[2:]), np.uint8)
    for start in range(0, len(pixels), 8192):
        out[start : start + 8192] = _convert_channels(pixels[start : start + 8192], channels)
    return out


def _reason(error: BaseException, path: str = "") -> str:
    """The library's message on one line, without the file name it may repeat."""
    text = " ".join(str(error).replace(f" '{path}'", "").split()).rstrip(".")
    return text or type(error).__name__


# ---- images --------------------------------------------------------------------------------------------------


# LANCZOS: the sharpest of PIL's antialiasing filters; BOX, a plain area average, differs from it by 6.6/255 on
# average on a 1024x768 photo. reducing_gap=3 first shrinks big images by whole factors, which PIL's docs call
# indistinguishable from the exact filter at >= 3 (0.6/255 on that photo, and 18 instead of 22 ms).
# NOTE: decoding and resizing 28-48 px PNGs runs at 6,800/s with LANCZOS against 12,900/s with BOX on a 2-core
# AMD EPYC (JPEGs: 8,600 and 10,000/s): well above the 2,000/s a core aimed at, and a cached folder never decodes.
def _fit(image: Image.Image) -> np.ndarray:
    """Centre-crop an L or RGB image to a square and resize it: uint8 (28, 28) or (28, 28, 3)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # crop, not resize(box=): that lets the filter read pixels outside the box (7/255 off at the edge in a test)
    if width != height:
        image = image.crop((left, top, left + side, top + side))
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0))


def _to_l_or_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """An image in L (grayscale modes) or RGB (every other mode, palettes included) and whether it is grayscale.

    Transparent pixels are composited onto white, as a viewer shows them: the colour stored under alpha 0 is
    arbitrary (often black), so dropping alpha would train on whatever the program that wrote the file left.
    """
    mode = image.mode
    gray = mode in _GRAY_MODES or mode.startswith("I;16")
    if mode == "I" or mode.startswith("I;16"):  # 16-bit grayscale PNG; PIL's convert("L") clips it at 255
        return Image.fromarray(np.rint(np.asarray(image, np.float64).clip(0, 65535) / 257).astype(np.uint8)), True
    if mode.endswith(("A", "a")) or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    target = "L" if gray else "RGB"
    return (image if image.mode == target else image.convert(target)), gray


def _decode(path: str) -> tuple[np.ndarray, bool]:
    with Image.open(path, formats=_PIL_FORMATS) as image:
        if image.format in ("JPEG", "MPO"):
            # NOTE: JPEG's DCT scaling decodes at 1/2, 1/4 or 1/8 size (never under 28 px): a 1024x768 photo in
            # 1.4 ms instead of 6.6 ms on a 2-core AMD EPYC, 0.4/255 mean difference from a full decode.
            image.draft(image.mode, (IMAGE_SIZE, IMAGE_SIZE))
        # Upright as a viewer shows it: phones store photos sideways with an EXIF orientation tag.
        converted, gray = _to_l_or_rgb(ImageOps.exif_transpose(image))
        return _fit(converted), gray


def _decode_chunk(paths: list[str], skip_bad: bool) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode `paths` in order: the readable ones as uint8 (k, C, 28, 28), C = 3 when any is colour (grayscale
    ones repeated), and (index, reason) per unreadable one; without skip_bad it stops at the first of those."""
    decoded, bad = [], []
    for i, path in enumerate(paths):
        try:
            decoded.append(_decode(path))
        # PIL's plugins raise many types for malformed files (OSError, ValueError, SyntaxError, struct.error,
        # DecompressionBombError, ...): whatever it is, the file is unreadable, which is the user's to fix.
        except Exception as e:
            bad.append((i, _reason(e, path)))
            if not skip_bad:
                break
    colour = not all(gray for _, gray in decoded)
    out = np.empty((len(decoded), 3 if colour else 1, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for j, (pixels, _) in enumerate(decoded):
        out[j] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (28, 28) broadcasts to every channel
    return out, bad


def _list_images(folder: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every regular image file under `folder`, sorted by relative path.
    Hidden files and folders are skipped; symlinked folders are not entered (a link to a parent would loop)."""
    found, pending = [], [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(folder / rel_dir) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(f"{rel_dir}{name}/")
                    elif name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
                        # NOTE: most of a warm load: 50,000 stats take 0.3-0.6 s, the cached pixels 0.02 s to
                        # read, on a 2-core AMD EPYC.
                        stat = entry.stat()
                        found.append((rel_dir + name, stat.st_size, stat.st_mtime_ns))
        except OSError as e:
            raise FastVAEError(f"cannot list {folder / rel_dir}: {e.strerror or e}; check its permissions") from e
    found.sort()
    return found


def _decode_folder(folder: Path, rels: list[str], skip_bad: bool, progress: bool, workers: int) -> np.ndarray:
    """Every image in `rels` (relative to `folder`) as uint8 (N, C, 28, 28) at the folder's own channels."""
    paths = [str(folder / rel) for rel in rels]
    # fork starts workers without re-importing torch, which spawn (Windows' only method) would do: one process there.
    forkable = "fork" in multiprocessing.get_all_start_methods()
    workers = max(1, min(workers, len(paths) // POOL_FILES_PER_WORKER)) if forkable else 1
    size = max(_CHUNK_FILES[0], min(_CHUNK_FILES[1], math.ceil(len(paths) / (4 * workers))))
    chunks = [paths[start : start + size] for start in range(0, len(paths), size)]
    parts, first_bad, skipped = [], None, 0
    futures: list[Future] = []
    with contextlib.ExitStack() as stack:
        if workers > 1:
            # With fork the pool starts every worker at the first submit: before tqdm's monitor thread exists.
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(chunks)),
                                                           mp_context=multiprocessing.get_context("fork")))
            futures = [pool.submit(_decode_chunk, chunk, skip_bad) for chunk in chunks]
            results = (future.result() for future in futures)
        else:
            results = (_decode_chunk(chunk, skip_bad) for chunk in chunks)
        bar = stack.enter_context(tqdm(total=len(paths), desc=f"decoding {folder}", unit="image", disable=not progress))
        # In file order, so the first bad file reported is the first in sorted order whatever finished first.
        for start, chunk, (pixels, bad) in zip(range(0, len(paths), size), chunks, results, strict=True):
            if bad and first_bad is None:
                first_bad = (rels[start + bad[0][0]], bad[0][1])
            if bad and not skip_bad:
                for future in futures:
                    future.cancel()
                raise FastVAEError(f"cannot read image {folder / first_bad[0]}: {first_bad[1]}; fix or remove it, "
                                   "or pass --skip-bad to skip unreadable images")
            parts.append(pixels)
            skipped += len(bad)
            bar.update(len(chunk))
    if skipped == len(paths):
        raise FastVAEError(f"no readable image in {folder}: {len(paths):,} of {len(paths):,} files failed to decode "
                           f"(first: {folder / first_bad[0]}: {first_bad[1]}); fix or replace them")
    channels = max(part.shape[1] for part in parts)
    out = np.empty((len(paths) - skipped, channels, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    filled = 0
    for part in parts:
        out[filled : filled + len(part)] = part  # a grayscale chunk broadcasts into a colour folder's 3 channels
        filled += len(part)
    return out


def _cache_file(cache_dir: Path, folder: Path, files: list[tuple[str, int, int]], skip_bad: bool) -> Path:
    # Pillow's version too: another libjpeg or resampling fix may change the pixels.
    text = json.dumps([_CACHE_FORMAT, PIL.__version__, str(folder.resolve()), skip_bad, files])
    return cache_dir / "images" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.npy"


def _read_cache(path: Path, files: int, skip_bad: bool) -> np.ndarray | None:
    """The cached array, or None when it is missing or not exactly what a decode would give. The header is checked
    against the file's size before anything is allocated, so a corrupt one cannot ask for memory."""
    try:
        with open(path, "rb") as f:
            shape, fortran_order, dtype, data_bytes = _npy_header(f)
            shape_ok = len(shape) == 4 and shape[1] in (1, 3) and shape[2:] == (IMAGE_SIZE, IMAGE_SIZE)
            count_ok = shape_ok and (1 <= shape[0] <= files if skip_bad else shape[0] == files)
            if not (count_ok and dtype == np.uint8 and not fortran_order and data_bytes == math.prod(shape)):
                return None
            pixels = np.empty(shape, np.uint8)
            return pixels if f.readinto(memoryview(pixels).cast("B")) == pixels.nbytes else None
    except (OSError, ValueError, EOFError, SyntaxError):
        return None


def _load_folder(folder: Path, channels: int | None, skip_bad: bool, cache_dir: Path, progress: bool,
                 workers: int) -> ImageSet:
    files = _list_images(folder)
    if not files:
        names = ", ".join(IMAGE_SUFFIXES[:-1]) + " or " + IMAGE_SUFFIXES[-1]
        raise FastVAEError(f"no {names} files in {folder}: put images there (subfolders are searched, hidden "
                           "ones skipped) or give a .npy/.npz array")
    cache_file = _cache_file(cache_dir, folder, files, skip_bad)
    pixels, notes = _read_cache(cache_file, len(files), skip_bad), []
    if pixels is not None:
        notes.append("cached")
    else:
        pixels = _decode_folder(folder, [rel for rel, _, _ in files], skip_bad, progress, workers)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, lambda f: np.save(f, pixels))
        except OSError as e:  # a read-only home or full disk costs the next run a decode, nothing more
            notes.append(f"not cached: cannot write {cache_file.parent} ({e.strerror or e})")
    skipped = len(files) - len(pixels)
    if skipped:
        notes.insert(0, f"{skipped:,} skipped")
    source_channels = pixels.shape[1]
    images = torch.from_numpy(convert_channels(pixels, channels))
    source = str(folder) if str(folder).endswith("/") else f"{folder}/"
    return ImageSet(images, source_channels, skipped,
                    _describe(len(images), source, source_channels, images.shape[1], notes))


# ---- arrays --------------------------------------------------------------------------------------------------


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and the bytes after the header of the .npy file `f` (left at its data)."""
    read = _NPY_HEADERS.get(np.lib.format.read_magic(f))
    if read is None:
        raise ValueError("a .npy format version numpy.save does not write")
    shape, fortran_order, dtype = read(f)
    return shape, fortran_order, dtype, os.fstat(f.fileno()).st_size - f.tell()


def _check(shape: tuple[int, ...], dtype: np.dtype, path: Path) -> None:
    """Refuse what is not a stack of images: ranks and channel counts other than the layouts', dtypes other than
    uint8 and floats, and arrays without pixels."""
    if not (len(shape) == 3 or (len(shape) == 4 and (shape[-1] in (1, 3) or shape[1] in (1, 3)))):
        raise FastVAEError(f"{path}: array of shape {shape} is not images: expected (N, H, W), (N, H, W, C) or "
                           "(N, C, H, W) with C = 1 or 3")
    if not (dtype == np.uint8 or (dtype.kind == "f" and dtype.itemsize in (2, 4, 8))):
        raise FastVAEError(f"{path}: dtype {dtype} is not supported: save uint8 (0-255) or float16/32/64 in [0, 1]")
    if 0 in shape:
        raise FastVAEError(f"{path}: array of shape {shape} holds no pixels: expected at least one image of at "
                           "least 1x1")


def _open_array(path: Path) -> np.ndarray:
    """The checked images array of a .npy (memory-mapped: read once, by the conversion) or .npz (read whole)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
            if magic == _NPY_MAGIC:
                f.seek(0)
                shape, _, dtype, data_bytes = _npy_header(f)
                _check(shape, dtype, path)
                if data_bytes != math.prod(shape) * dtype.itemsize:
                    raise FastVAEError(f"{path} is truncated or corrupt: its header says {shape} {dtype}, "
                                       f"{math.prod(shape) * dtype.itemsize:,} bytes, and it holds {data_bytes:,}; "
                                       "save it again")
                return np.load(path, mmap_mode="r", allow_pickle=False)
            if not magic.startswith(b"PK"):
                raise FastVAEError(f"cannot read array file {path}: it is neither .npy data nor a zip archive (.npz); "
                                   "save images with numpy.save or numpy.savez")
            f.seek(0)
            # np.load given our file, not the path: it leaks the file it opens itself when the zip is broken.
            with np.load(f, allow_pickle=False) as loaded:
                names = loaded.files
                if "images" not in names and len(names) != 1:
                    found = ", ".join(repr(name) for name in names) or "none"
                    raise FastVAEError(f"{path}: expected one array or one named 'images', found {len(names)} "
                                       f"({found}); save it with numpy.savez(file, images=array)")
                name = "images" if "images" in names else names[0]
                array = loaded[name]
                if not isinstance(array, np.ndarray):  # a zip member that is not .npy data comes back as bytes
                    raise FastVAEError(f"{path}: {name!r} is not a NumPy array; save images with numpy.savez")
    except (OSError, ValueError, EOFError, SyntaxError, TypeError, zipfile.BadZipFile, zlib.error) as e:
        raise FastVAEError(f"cannot read array file {path}: {_reason(e)}; save images with numpy.save or "
                           "numpy.savez") from e
    _check(array.shape, array.dtype, path)
    return array


def _nhwc(array: np.ndarray) -> np.ndarray:
    """A (N, H, W, C) view of a checked array: (N, H, W, C) when the last axis is 1 or 3, else (N, C, H, W)."""
    if array.ndim == 3:
        return array[..., None]
    return array if array.shape[-1] in (1, 3) else array.transpose(0, 2, 3, 1)


def _to_uint8(block: np.ndarray, start: int, path: Path) -> np.ndarray:
    """uint8 as is; floats checked to be finite and in [0, 1], then scaled by 255 and rounded."""
    if block.dtype == np.uint8:
        return block
    finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
    if not finite.all():
        first = start + int(np.flatnonzero(~finite)[0])
        raise FastVAEError(f"{path}: float array holds NaN or inf (first in image {first}); expected values in [0, 1]")
    low, high = float(block.min()), float(block.max())
    if low < 0 or high > 1:
        raise FastVAEError(f"{path}: float values outside [0, 1] (min {low:g}, max {high:g} in images {start} to "
                           f"{start + len(block) - 1}): scale them to [0, 1] or save uint8 0-255")
    return np.rint(block * np.float32(255)).astype(np.uint8)


def _load_array(path: Path, channels: int | None) -> ImageSet:
    view = _nhwc(_open_array(path))
    count, height, width, source_channels = view.shape
    out = np.empty((count, channels or source_channels, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    # Memory: the output and one block; for a .npz also the array it held (np.load cannot map a zip member).
    step = max(1, _ARRAY_BLOCK_BYTES // (height * width * source_channels * view.dtype.itemsize))
    for start in range(0, count, step):
        block = _to_uint8(np.asarray(view[start : start + step]), start, path)  # (k, H, W, C)
        if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
            fitted = [_fit(Image.fromarray(image[..., 0] if source_channels == 1 else image)) for image in block]
            block = np.stack(fitted).reshape(len(block), IMAGE_SIZE, IMAGE_SIZE, source_channels)
        out[start : start + len(block)] = _convert_channels(block.transpose(0, 3, 1, 2), channels)
    notes = [] if (height, width) == (IMAGE_SIZE, IMAGE_SIZE) else [f"{height}x{width} cropped and resized to 28x28"]
    return ImageSet(torch.from_numpy(out), source_channels, 0,
                    _describe(count, str(path), source_channels, out.shape[1], notes))
