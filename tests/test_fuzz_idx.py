"""Property-based tests of read_idx: every file either reads as the array its header describes or raises
FastVAEError with a one-line message; no other exception, no hang, no memory beyond what the header justifies.
"""

from __future__ import annotations

import gzip
import tracemalloc
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fastvae.data import read_idx, write_idx
from fastvae.errors import FastVAEError

# derandomize: CI tries the same examples every run, so no example database is kept either.
FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=3000)
GZIP_MAGIC = b"\x1f\x8b"
SLACK = 2 << 20  # bytes the reader may allocate beyond its input: zlib's window, one inflate chunk, small objects
# Dims that break naive size arithmetic: 0xFFFFFFFF**4 overflows int64, 65536**4 wraps it to exactly 0.
EDGE_DIMS = st.sampled_from([0, 1, 2, 28, 2**16, 2**31, 2**32 - 1])
DIMS = st.one_of(EDGE_DIMS, st.integers(0, 2**32 - 1))


def idx_header(dims: list[int] | tuple[int, ...], type_code: int = 0x08, magic: bytes = b"\0\0") -> bytes:
    return magic + bytes([type_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


# A valid file the size of two images, smooth enough that gzip codes it with Huffman tables and back-references.
IMAGES = (np.add.outer(np.arange(28), np.arange(28)) * np.arange(1, 3)[:, None, None] % 256).astype(np.uint8)
IMAGES[:, ::5, ::3] ^= 0x55
PLAIN = idx_header(IMAGES.shape) + IMAGES.tobytes()
GZIP = gzip.compress(PLAIN, mtime=0)
VALID = pytest.mark.parametrize("blob", [PLAIN, GZIP], ids=["plain", "gzip"])


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "input"


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak traced allocation while fn runs (numpy, zlib and bytes all report to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def read_or_refuse(path: Path, blob: bytes) -> np.ndarray | None:
    """read_idx on `blob`: the array its header describes, or None after a one-line FastVAEError naming the file.

    Any other exception propagates and fails the test. The oracle for a successful read is the stdlib's gzip.
    """
    path.write_bytes(blob)
    try:
        array = read_idx(path)
    except FastVAEError as e:
        message = str(e)
        assert str(path) in message and "\n" not in message, message
        return None
    content = gzip.decompress(blob) if blob[:2] == GZIP_MAGIC else blob
    ndim = content[3]
    assert content[:3] == b"\0\0\x08" and ndim >= 1
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    assert array.dtype == np.uint8 and array.shape == dims
    assert array.tobytes() == content[4 + 4 * ndim :]
    return array


def near_edges(n: int) -> st.SearchStrategy[int]:
    """Positions in [0, n), weighted toward the header (first 32 bytes) and the gzip trailer (last 16)."""
    return st.one_of(st.integers(0, min(31, n - 1)), st.integers(max(0, n - 16), n - 1), st.integers(0, n - 1))


@FUZZ
@given(array=arrays(np.uint8, array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9)), compress=st.booleans())
def test_write_idx_round_trips(path: Path, array: np.ndarray, compress: bool) -> None:
    target = path.with_suffix(".gz" if compress else ".idx")
    write_idx(target, array)
    np.testing.assert_array_equal(read_idx(target), array, strict=True)


@VALID
def test_every_truncation_is_refused(path: Path, blob: bytes) -> None:
    for n in range(len(blob)):
        assert read_or_refuse(path, blob[:n]) is None, n


@VALID
@FUZZ
@given(data=st.data())
def test_truncation_is_refused(path: Path, blob: bytes, data: st.DataObject) -> None:
    n = data.draw(near_edges(len(blob)), label="length")
    assert read_or_refuse(path, blob[:n]) is None


@VALID
@FUZZ
@given(data=st.data())
def test_bit_flips(path: Path, blob: bytes, data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.tuples(near_edges(len(blob)), st.integers(0, 7)), min_size=1, max_size=8))
    corrupt = bytearray(blob)
    for i, bit in flips:
        corrupt[i] ^= 1 << bit
    read_or_refuse(path, bytes(corrupt))


@FUZZ
@given(
    magic=st.one_of(st.just(b"\0\0"), st.binary(min_size=2, max_size=2)),
    type_code=st.one_of(st.just(0x08), st.integers(0, 255)),
    dims=st.one_of(
        st.lists(EDGE_DIMS, max_size=6), st.lists(DIMS, max_size=40), st.integers(33, 255).map(lambda n: [1] * n)
    ),
    ndim=st.one_of(st.none(), st.integers(0, 255)),
    payload=st.one_of(st.just(b""), st.binary(max_size=64), st.just(PLAIN[16:])),
    compress=st.booleans(),
)
# Regressions the strategies reach only rarely: numpy's 64-dim limit, int64 wrap-around to exactly 0, an empty
# shape numpy still refuses, and a 0-dim header.
@example(magic=b"\0\0", type_code=8, dims=[1] * 65, ndim=None, payload=b"\0", compress=False)
@example(magic=b"\0\0", type_code=8, dims=[2**16] * 4, ndim=None, payload=b"", compress=False)
@example(magic=b"\0\0", type_code=8, dims=[0, *[2**32 - 1] * 3], ndim=None, payload=b"", compress=True)
@example(magic=b"\0\0", type_code=8, dims=[], ndim=None, payload=b"\0", compress=False)
def test_wrong_headers(
    path: Path, magic: bytes, type_code: int, dims: list[int], ndim: int | None, payload: bytes, compress: bool
) -> None:
    header = bytearray(idx_header(dims, type_code, magic))
    if ndim is not None:  # a dimension count that disagrees with the dims that follow
        header[3] = ndim
    content = bytes(header) + payload
    assume(content[:2] != GZIP_MAGIC)
    blob = gzip.compress(content, mtime=0) if compress else content
    array = read_or_refuse(path, blob)
    if magic != b"\0\0" or type_code != 0x08 or not 1 <= header[3] <= 32:
        assert array is None


@FUZZ
@given(
    prefix=st.sampled_from([b"", GZIP_MAGIC, GZIP_MAGIC + b"\x08\0", b"\0\0\x08\x03", PLAIN[:16]]),
    garbage=st.binary(max_size=4096),
)
def test_random_bytes(path: Path, prefix: bytes, garbage: bytes) -> None:
    read_or_refuse(path, prefix + garbage)


@FUZZ
@given(prefix=st.sampled_from([b"", b"\0\0\x08\x01", PLAIN[:16]]), garbage=st.binary(max_size=4096))
def test_valid_gzip_of_garbage(path: Path, prefix: bytes, garbage: bytes) -> None:
    read_or_refuse(path, gzip.compress(prefix + garbage, mtime=0))


@FUZZ
@given(cuts=st.lists(st.integers(0, len(PLAIN)), max_size=4))
def test_concatenated_members_read_as_one_stream(path: Path, cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(PLAIN)]
    blob = b"".join(gzip.compress(PLAIN[a:b], mtime=0) for a, b in pairwise(bounds))
    np.testing.assert_array_equal(read_or_refuse(path, blob), IMAGES, strict=True)


@VALID
@FUZZ
@given(data=st.data())
def test_trailing_bytes_are_refused(path: Path, blob: bytes, data: st.DataObject) -> None:
    garbage = st.binary(min_size=1, max_size=64).filter(lambda tail: tail[:2] != GZIP_MAGIC)
    cut_member = st.integers(1, len(GZIP) - 1).map(lambda n: GZIP[:n])
    tail = data.draw(st.one_of(garbage, cut_member), label="tail")
    assert read_or_refuse(path, blob + tail) is None


@FUZZ
@given(extra=st.integers(1, 2**20), fill=st.sampled_from([b"\0", b"\xff", b"ab"]))
def test_gzip_longer_than_its_header_is_refused(path: Path, extra: int, fill: bytes) -> None:
    blob = gzip.compress(PLAIN + fill * extra, mtime=0)
    assert read_or_refuse(path, blob) is None


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """89 KB of gzip that inflates to 88 MB, behind a header that claims two images (1,568 bytes)."""
    return gzip.compress(PLAIN + bytes(88 << 20), compresslevel=9, mtime=0)


def test_gzip_bomb_is_refused_in_bounded_memory(path: Path, bomb: bytes) -> None:
    path.write_bytes(bomb)
    with pytest.raises(FastVAEError, match="header says"):
        read_idx(path)
    assert peak_bytes(lambda: read_or_refuse(path, bomb)) < len(bomb) + len(PLAIN) + SLACK


@pytest.mark.parametrize(
    "dims",
    [(2**32 - 1,) * 4, (2**16,) * 4, (0, 2**32 - 1, 2**32 - 1, 2**32 - 1), (2**32 - 1,) * 3, (2**32 - 1,)],
    ids=["0xFFFFFFFF**4", "65536**4", "0-by-huge", "0xFFFFFFFF**3", "4GiB"],
)
@pytest.mark.parametrize(
    "compress, payload", [(False, 0), (True, 0), (True, 8 << 20)], ids=["plain", "gzip", "gzip-8MB-of-zeros"]
)
def test_huge_dims_are_refused_in_bounded_memory(
    path: Path, dims: tuple[int, ...], compress: bool, payload: int
) -> None:
    # The reader may inflate the 8 MB payload (a 4 GiB header justifies that much; its bytearray grows by up to
    # 1/8 more) but never allocates what a header claims.
    content = idx_header(dims) + bytes(payload)
    blob = gzip.compress(content, mtime=0) if compress else content
    assert peak_bytes(lambda: read_or_refuse(path, blob)) < len(blob) + payload + payload // 8 + SLACK
    path.write_bytes(blob)
    with pytest.raises(FastVAEError):
        read_idx(path)
