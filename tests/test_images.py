"""fastvae.images: folders and arrays of the user's own images as uint8 (N, C, 28, 28), the folder cache, bad
input as one-line FastVAEErrors, and the process pool against the single-process path."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastvae.images as images
from fastvae.errors import FastVAEError
from fastvae.images import ImageSet, is_image_source, load_image_source


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _save(path: Path, pixels: np.ndarray, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return path


def _noise(rng: np.random.Generator, height: int, width: int, colour: bool) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3) if colour else (height, width), dtype=np.uint8)


def _smooth(height: int, width: int) -> np.ndarray:
    """A grayscale gradient: JPEG keeps it close, where it smears noise."""
    return np.add.outer(np.linspace(0, 120, height), np.linspace(0, 130, width)).astype(np.uint8)


def _reference(pixels: np.ndarray) -> np.ndarray:
    """The plain twin of the decoder for one in-memory L or RGB image: crop the centre square, LANCZOS to 28x28,
    as (C, 28, 28)."""
    image = Image.fromarray(pixels)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    out = np.asarray(image.crop((left, top, left + side, top + side)).resize((28, 28), Image.Resampling.LANCZOS))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def _load(path: Path, tmp_path: Path, **options: object) -> ImageSet:
    options.setdefault("cache_dir", tmp_path / "cache")
    return load_image_source(path, progress=False, **options)


def _one_line_error(call: Callable[[], object], *fragments: str) -> str:
    with pytest.raises(FastVAEError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message
    return message


@pytest.fixture
def gray_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Three grayscale images of odd sizes, PNG and JPEG, one in a subfolder; hidden colour images and a text file
    that must be skipped (were they read, the folder would be colour)."""
    rng, folder = _rng(0), tmp_path / "gray"
    pixels = {"a.png": _noise(rng, 17, 31, False), "b.jpg": _smooth(64, 64),
              "sub/c.png": _noise(rng, 28, 28, False)}
    for name, image in pixels.items():
        _save(folder / name, image)
    _save(folder / ".hidden.png", _noise(rng, 28, 28, True))
    _save(folder / ".cache" / "d.png", _noise(rng, 28, 28, True))
    (folder / "notes.txt").write_text("not an image")
    return folder, pixels


def test_is_image_source() -> None:
    assert not is_image_source("mnist") and not is_image_source("fashion-mnist")
    assert is_image_source("photos/") and is_image_source("images.npy") and is_image_source("./mnist")


def test_grayscale_folder(gray_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    folder, pixels = gray_folder
    loaded = _load(folder, tmp_path)
    assert loaded.images.shape == (3, 1, 28, 28) and loaded.images.dtype == torch.uint8
    assert loaded.images.is_contiguous() and loaded.images.device.type == "cpu"
    assert (loaded.source_channels, loaded.skipped) == (1, 0)
    assert loaded.description == f"3 images from {folder}/ (grayscale, 1 channel)"
    got = loaded.images.numpy()
    np.testing.assert_array_equal(got[0], _reference(pixels["a.png"]))  # sorted: a.png, b.jpg, sub/c.png
    np.testing.assert_array_equal(got[2], pixels["sub/c.png"][None])  # 28x28 PNG: exact round trip
    assert np.abs(got[1].astype(int) - _reference(pixels["b.jpg"])).max() <= 3  # JPEG: lossy, decoded at 32x32
    np.testing.assert_array_equal(_load(folder, tmp_path / "again").images.numpy(), got)  # deterministic order
    as_rgb = _load(folder, tmp_path, channels=3)
    assert as_rgb.images.shape == (3, 3, 28, 28) and as_rgb.source_channels == 1
    assert "converted to 3 channels" in as_rgb.description
    np.testing.assert_array_equal(as_rgb.images.numpy(), np.repeat(got, 3, axis=1))


def test_mixed_folder_is_colour(gray_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    folder, pixels = gray_folder
    colour = _noise(_rng(1), 40, 30, True)
    _save(folder / "sub" / "b.png", colour)
    gray_only = _load(folder, tmp_path, channels=1).images.numpy()
    loaded = _load(folder, tmp_path)
    assert loaded.images.shape == (4, 3, 28, 28) and loaded.source_channels == 3
    got = loaded.images.numpy()
    np.testing.assert_array_equal(got[2], _reference(colour))
    for index in (0, 1, 3):  # grayscale images repeat in all three channels
        assert (got[index] == got[index, :1]).all()
    as_gray = _load(folder, tmp_path, channels=1)
    assert as_gray.images.shape == (4, 1, 28, 28) and as_gray.source_channels == 3
    np.testing.assert_array_equal(as_gray.images.numpy(), gray_only)
    luma = np.asarray(Image.fromarray(got[2].transpose(1, 2, 0)).convert("L"))  # PIL's own RGB -> L
    np.testing.assert_array_equal(as_gray.images.numpy()[2, 0], luma)
    np.testing.assert_array_equal(as_gray.images.numpy()[0], got[0, :1])


def test_round_trip_and_centre_crop(tmp_path: Path) -> None:
    rng = _rng(2)
    gray, colour = _noise(rng, 28, 28, False), _noise(rng, 28, 28, True)
    _save(tmp_path / "exact" / "gray.png", gray)
    _save(tmp_path / "exact" / "rgb.png", colour)
    loaded = _load(tmp_path / "exact", tmp_path).images.numpy()
    np.testing.assert_array_equal(loaded[0], np.repeat(gray[None], 3, axis=0))
    np.testing.assert_array_equal(loaded[1], colour.transpose(2, 0, 1))
    wide = np.full((56, 168), 128, np.uint8)  # the centre square: white above black; mid-gray either side
    wide[:28, 56:112], wide[28:, 56:112] = 255, 0
    _save(tmp_path / "wide" / "wide.png", wide)
    _save(tmp_path / "tall" / "tall.png", np.ascontiguousarray(wide.T))  # white left of black, gray above, below
    got = {name: _load(tmp_path / name, tmp_path).images.numpy()[0, 0].astype(int) for name in ("wide", "tall")}
    assert (got["wide"] == got["wide"][:, :1]).all() and (got["tall"] == got["tall"][:1]).all()  # no gray came in
    assert (got["wide"] == got["tall"].T).all()
    edge = np.abs(got["wide"][:, 0] - np.repeat([255, 0], 14))
    assert edge[:12].max() <= 5 and edge[16:].max() <= 5 and edge.max() <= 20, got["wide"][:, 0]  # LANCZOS rings


def test_alpha_palette_and_16_bit(tmp_path: Path) -> None:
    half = np.zeros((28, 28, 4), np.uint8)  # left: black at alpha 0, so white once composited; right: opaque red
    half[:, 14:] = (255, 0, 0, 255)
    _save(tmp_path / "f" / "a_rgba.png", half)
    palette = Image.fromarray(_noise(_rng(3), 28, 28, True)).quantize(16)
    palette.save(tmp_path / "f" / "b_palette.png")
    palette.save(tmp_path / "f" / "c_palette_transparent.png", transparency=int(np.asarray(palette)[0, 0]))
    loaded = _load(tmp_path / "f", tmp_path)
    assert loaded.images.shape == (3, 3, 28, 28) and loaded.source_channels == 3  # palettes count as colour
    got = loaded.images.numpy()
    assert (got[0, :, :, :14] == 255).all() and (got[0, :, :, 14:].transpose(1, 2, 0) == (255, 0, 0)).all()
    np.testing.assert_array_equal(got[1], np.asarray(palette.convert("RGB")).transpose(2, 0, 1))
    assert (got[2, :, 0, 0] == 255).all()
    deep = _noise(_rng(4), 28, 28, False).astype(np.uint16) * 257  # a 16-bit grayscale PNG, 0-65535
    _save(tmp_path / "g" / "x.png", deep)
    _save(tmp_path / "g" / "y_la.png", np.stack([deep.astype(np.uint8), np.full((28, 28), 255, np.uint8)], -1))
    loaded = _load(tmp_path / "g", tmp_path)
    assert loaded.source_channels == 1
    np.testing.assert_array_equal(loaded.images.numpy()[0, 0], deep // 257)


# ---- arrays --------------------------------------------------------------------------------------------------


def _layouts(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """(N, H, W, C) pixels in every accepted layout."""
    if pixels.shape[-1] == 1:
        return {"NHW": pixels[..., 0], "NHW1": pixels, "N1HW": pixels.transpose(0, 3, 1, 2)}
    return {"NHW3": pixels, "N3HW": pixels.transpose(0, 3, 1, 2)}


@pytest.mark.parametrize("channels, height, width", [(1, 28, 28), (3, 28, 28), (1, 17, 31), (3, 40, 33)], ids=str)
def test_arrays_every_layout_and_dtype(tmp_path: Path, channels: int, height: int, width: int) -> None:
    pixels = _rng(5).integers(0, 256, (4, height, width, channels), dtype=np.uint8)
    expected = np.stack([_reference(image[..., 0] if channels == 1 else image) for image in pixels])
    for layout, array in _layouts(pixels).items():
        for dtype in (np.uint8, np.float16, np.float32, np.float64):
            values = array if dtype is np.uint8 else (array / 255).astype(dtype)
            for kind in ("npy", "npz", "npz-images"):
                path = tmp_path / f"{layout}-{np.dtype(dtype).name}-{kind}.{kind[:3]}"
                if kind == "npy":
                    np.save(path, values)
                elif kind == "npz":
                    np.savez(path, anything=values)
                else:
                    np.savez_compressed(path, labels=np.arange(4), images=values)
                loaded = _load(path, tmp_path)
                assert (loaded.source_channels, loaded.images.dtype) == (channels, torch.uint8), path
                np.testing.assert_array_equal(loaded.images.numpy(), expected, err_msg=str(path))
    path = tmp_path / "NHW3-float32-npy.npy" if channels == 3 else tmp_path / "NHW-uint8-npy.npy"
    other = 1 if channels == 3 else 3
    converted = _load(path, tmp_path, channels=other).images
    assert converted.shape == (4, other, 28, 28)
    _save(tmp_path / "folder" / "0.png", pixels[0, ..., 0] if channels == 1 else pixels[0])
    folder = _load(tmp_path / "folder", tmp_path, channels=other).images
    np.testing.assert_array_equal(converted[:1], folder)  # array and folder agree, converted or not


def _npy(array: np.ndarray, **options: object) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        np.save(folder / "x.npy", array, **options)
        return folder / "x.npy"
    return write


def _npz(**arrays: np.ndarray) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        np.savez(folder / "x.npz", **arrays)
        return folder / "x.npz"
    return write


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name
    return write


def _truncated_npy(folder: Path) -> Path:
    np.save(folder / "x.npy", np.zeros((10, 28, 28), np.uint8))
    data = (folder / "x.npy").read_bytes()
    (folder / "x.npy").write_bytes(data[:-100])
    return folder / "x.npy"


def _zip_of_text(folder: Path) -> Path:
    with zipfile.ZipFile(folder / "x.npz", "w") as archive:
        archive.writestr("notes.txt", "not an array")
    return folder / "x.npz"


_GOOD = np.zeros((2, 28, 28), np.uint8)
_NAN = np.zeros((3, 28, 28), np.float32)
_NAN[2, 5, 5] = np.nan
BAD_ARRAYS = {
    "rank 2": (_npy(np.zeros((5, 28), np.uint8)), "shape (5, 28) is not images"),
    "rank 5": (_npy(np.zeros((1, 1, 28, 28, 1), np.uint8)), "shape (1, 1, 28, 28, 1) is not images"),
    "4 channels": (_npy(np.zeros((2, 4, 28, 28), np.uint8)), "shape (2, 4, 28, 28) is not images"),
    "bool": (_npy(np.zeros((2, 28, 28), bool)), "dtype bool is not supported"),
    "int64": (_npy(np.zeros((2, 28, 28), np.int64)), "dtype int64 is not supported"),
    "uint16": (_npy(np.zeros((2, 28, 28), np.uint16)), "dtype uint16 is not supported"),
    "complex": (_npy(np.zeros((2, 28, 28), np.complex64)), "dtype complex64 is not supported"),
    "object": (_npy(np.array([[[None]]], dtype=object), allow_pickle=True), "dtype object is not supported"),
    "above 1": (_npy(np.full((2, 28, 28), 1.5, np.float32)), "float values outside [0, 1] (min 1.5, max 1.5"),
    "below 0": (_npy(np.full((2, 28, 28), -0.25)), "outside [0, 1] (min -0.25"),
    "nan": (_npy(_NAN), "NaN or inf (first in image 2)"),
    "inf": (_npy(np.full((2, 28, 28), np.inf, np.float16)), "NaN or inf (first in image 0)"),
    "no images": (_npy(np.zeros((0, 28, 28), np.uint8)), "shape (0, 28, 28) holds no pixels"),
    "no width": (_npy(np.zeros((3, 28, 0), np.uint8)), "shape (3, 28, 0) holds no pixels"),
    "two arrays": (_npz(a=_GOOD, b=_GOOD), "found 2 ('a', 'b')"),
    "empty npz": (_npz(), "found 0 (none)"),
    "truncated npy": (_truncated_npy, "is truncated or corrupt: its header says (10, 28, 28) uint8, 7,840 bytes"),
    "not npy": (_bytes("x.npy", b"hello"), "neither .npy data nor a zip archive"),
    "empty file": (_bytes("x.npy", b""), "neither .npy data nor a zip archive"),
    "bad npy header": (_bytes("x.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': <nope"), "cannot read array file"),
    "not npz": (_bytes("x.npz", b"PK\x03\x04 nope"), "cannot read array file"),
    "zip of text": (_zip_of_text, "'notes.txt' is not a NumPy array"),
    "text file": (_bytes("x.txt", b"1 2 3"), "is not a folder or a .npy/.npz file"),
    "one image": (lambda folder: _save(folder / "x.png", _GOOD[0]), "is not a folder or a .npy/.npz file"),
}


@pytest.mark.parametrize("case", BAD_ARRAYS)
def test_bad_array_sources(tmp_path: Path, case: str) -> None:
    write, fragment = BAD_ARRAYS[case]
    path = write(tmp_path)
    _one_line_error(lambda: _load(path, tmp_path), str(path), fragment)


def test_bad_arguments(tmp_path: Path) -> None:
    _one_line_error(lambda: _load(tmp_path / "nowhere", tmp_path), "nowhere does not exist", "mnist")
    np.save(tmp_path / "x.npy", _GOOD)
    for channels in (0, 2, 4, True):
        _one_line_error(lambda c=channels: _load(tmp_path / "x.npy", tmp_path, channels=c), "channels must be 1 or 3")
    _one_line_error(lambda: _load(tmp_path, tmp_path, workers=0), "workers must be at least 1")


# ---- the folder cache ----------------------------------------------------------------------------------------


@pytest.fixture
def counted_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of folder decodes so far, as the list's length."""
    calls, decode = [], images._decode_folder

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(images, "_decode_folder", counting)
    return calls


def test_cache_hit_and_invalidation(gray_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                    counted_decodes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = gray_folder
    first = _load(folder, tmp_path)
    assert "cached" not in first.description and len(counted_decodes) == 1
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 1

    def no_decode(*args: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(images, "_decode_folder", no_decode)
        second = _load(folder, tmp_path)
        assert second.description.endswith("; cached)") and second.source_channels == 1
        assert torch.equal(second.images, first.images)
        assert _load(folder, tmp_path, channels=3).images.shape == (3, 3, 28, 28)  # converted from the cache
    stat = (folder / "b.jpg").stat()
    os.utime(folder / "b.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: rebuilt
    assert "cached" not in _load(folder, tmp_path).description and len(counted_decodes) == 2
    _save(folder / "sub" / "e.png", _noise(_rng(6), 30, 30, False))
    assert _load(folder, tmp_path).images.shape == (4, 1, 28, 28) and len(counted_decodes) == 3
    assert "cached" not in _load(folder, tmp_path, skip_bad=True).description  # skip_bad is in the key
    assert len(counted_decodes) == 4


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape", "wrong dtype", "too few", "npz"])
def test_corrupt_cache_is_rebuilt(gray_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                  counted_decodes: list[int], damage: str) -> None:
    folder, _ = gray_folder
    expected = _load(folder, tmp_path).images
    (cache_file,) = (tmp_path / "cache" / "images").glob("*.npy")
    data = cache_file.read_bytes()
    if damage == "truncated":
        cache_file.write_bytes(data[: len(data) - 5])
    elif damage == "garbage":
        cache_file.write_bytes(b"\x93NUMPY garbage" + data[20:])
    elif damage == "npz":
        with open(cache_file, "wb") as f:
            np.savez(f, expected.numpy())
    else:
        wrong = {"wrong shape": np.zeros((3, 1, 14, 14), np.uint8), "wrong dtype": expected.numpy().astype(np.int16),
                 "too few": expected.numpy()[:2]}[damage]
        with open(cache_file, "wb") as f:
            np.save(f, wrong)
    rebuilt = _load(folder, tmp_path)
    assert "cached" not in rebuilt.description and len(counted_decodes) == 2
    assert torch.equal(rebuilt.images, expected)
    assert _load(folder, tmp_path).description.endswith("; cached)")  # and written again, whole


def test_unwritable_cache_still_loads(gray_folder: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    folder, _ = gray_folder
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where the cache folder would go; unwritable even for root")
    loaded = _load(folder, tmp_path, cache_dir=blocked)
    assert loaded.images.shape == (3, 1, 28, 28)
    assert f"not cached: cannot write {blocked / 'images'}" in loaded.description


# ---- bad files and the pool ----------------------------------------------------------------------------------


def _bad_folder(folder: Path, good: int = 2) -> Path:
    for i in range(good):
        _save(folder / f"good{i}.png", _noise(_rng(i), 30, 20, False))
    png = (folder / "good0.png").read_bytes()
    (folder / "b_truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "c_text.jpg").write_text("this is not a JPEG")
    return folder


def test_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _bad_folder(tmp_path / "bad")
    _one_line_error(lambda: _load(folder, tmp_path), f"cannot read image {folder / 'b_truncated.png'}: ", "--skip-bad")
    loaded = _load(folder, tmp_path, skip_bad=True)
    assert (len(loaded.images), loaded.skipped) == (2, 2) and "; 2 skipped" in loaded.description
    assert _load(folder, tmp_path, skip_bad=True).description.endswith("2 skipped; cached)")
    for name in ("good0.png", "good1.png"):
        (folder / name).unlink()
    _one_line_error(lambda: _load(folder, tmp_path, skip_bad=True), f"no readable image in {folder}",
                    f"(first: {folder / 'b_truncated.png'}: ")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    _save(tmp_path / "empty" / ".hidden" / "x.png", _GOOD[0])
    _one_line_error(lambda: _load(tmp_path / "empty", tmp_path),
                    f"no .png, .jpg, .jpeg, .bmp or .webp files in {tmp_path / 'empty'}")
    _save(tmp_path / "bomb" / "x.png", _GOOD[0])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 28x28 = 784 pixels > 2 * 100: a "decompression bomb"
    _one_line_error(lambda: _load(tmp_path / "bomb", tmp_path), str(tmp_path / "bomb" / "x.png"), "decompression bomb")


def _big_folder(folder: Path, count: int) -> Path:
    """`count` tiny images, mostly grayscale (so some pool chunks are all grayscale, others mixed)."""
    rng = _rng(7)
    for i in range(count):
        side = int(rng.integers(20, 40))
        _save(folder / f"{i // 50}" / f"{i:04d}.{'jpg' if i % 3 else 'png'}", _noise(rng, side, 28, i % 17 == 0))
    return folder


def test_pool_matches_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _big_folder(tmp_path / "big", 200)
    one = _load(folder, tmp_path / "one", workers=1)
    monkeypatch.setattr(images, "POOL_FILES_PER_WORKER", 8)
    monkeypatch.setattr(images, "_CHUNK_FILES", (4, 8))
    pooled = _load(folder, tmp_path / "pool", workers=2)
    assert pooled.images.shape == (200, 3, 28, 28)
    assert torch.equal(pooled.images, one.images)
    files = sorted(folder.rglob("*.*"))  # in the loader's order: the folders and names sort by number
    files[151].write_bytes(files[151].read_bytes()[:200])
    files[170].write_text("broken")
    files[190].write_text("broken")
    _one_line_error(lambda: _load(folder, tmp_path / "pool", workers=2), f"cannot read image {files[151]}: ")
    skipped = _load(folder, tmp_path / "pool", workers=2, skip_bad=True)
    assert (skipped.skipped, len(skipped.images)) == (3, 197)
    keep = [i for i in range(200) if i not in (151, 170, 190)]
    assert torch.equal(skipped.images, one.images[keep])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A photo stored sideways with an EXIF orientation tag loads upright, as a viewer shows it."""
    upright = np.zeros((28, 28), np.uint8)
    upright[:6] = 255  # a bright band at the top
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # on disk turned 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    folder = tmp_path / "photos"
    folder.mkdir()
    stored.save(folder / "p.png", exif=exif)
    images = load_image_source(folder, cache_dir=tmp_path / "cache", progress=False).images
    assert images[0, 0, :6].float().mean() > 200 and images[0, 0, -6:].float().mean() < 50
