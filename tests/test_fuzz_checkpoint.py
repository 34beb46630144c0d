"""Fuzzing the checkpoint readers: a run folder whose weights, optimizer state or run.json is truncated, bit-flipped
or given a wrong header either loads or raises FastVAEError with a message, and never anything else."""

from __future__ import annotations

import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastvae.checkpoint import load_optimizer_state, load_weights
from fastvae.cli import main
from fastvae.errors import FastVAEError
from fastvae.run_folder import OPTIMIZER, RECORD, WEIGHTS, load_record

FUZZ = settings(max_examples=100, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
# The readers may not grow the process by more than this for any input (the files are a few hundred kB).
MAX_GROWTH_KB = 256 * 1024


@pytest.fixture(scope="module")
def run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("fuzz") / "run"
    assert main(["train", "--data-dir", str(tiny_data_dir), "--batch-size", "32", "--limit-train", "32",
                 "--epochs", "1", "--z-dim", "2", "--out", str(out), "--no-progress"]) == 0
    yield out


def _files(run: Path) -> dict[str, Path]:
    return {WEIGHTS: run / "epoch-1" / WEIGHTS, OPTIMIZER: run / "epoch-1" / OPTIMIZER, RECORD: run / RECORD}


def _load_all(run: Path) -> None:
    """Every reader of a run folder, as eval, export and --resume use them."""
    load_record(run)
    _, _, epoch = load_weights(run)
    load_optimizer_state(run, epoch)


def _check(run: Path, name: str, content: bytes) -> None:
    """Write `content` in place of file `name`, read the folder, put the file back."""
    path = _files(run)[name]
    original = path.read_bytes()
    path.write_bytes(content)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        _load_all(run)
    except FastVAEError as e:
        assert str(e) and "\n" not in str(e), repr(e)
    finally:
        path.write_bytes(original)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert growth < MAX_GROWTH_KB, f"reading a {len(content)}-byte {name} grew the process by {growth} kB"


names = st.sampled_from([WEIGHTS, OPTIMIZER, RECORD])


@FUZZ
@given(name=names, fraction=st.floats(0, 1, exclude_max=True))
@example(name=WEIGHTS, fraction=0.0).via("empty")
@example(name=WEIGHTS, fraction=0.001).via("inside the length field")
def test_truncated(run: Path, name: str, fraction: float) -> None:
    content = _files(run)[name].read_bytes()
    _check(run, name, content[: int(len(content) * fraction**2)])  # squared: more cuts near the header


@FUZZ
@given(name=names, data=st.data())
def test_bit_flips(run: Path, name: str, data: st.DataObject) -> None:
    content = bytearray(_files(run)[name].read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        header = data.draw(st.booleans())
        position = data.draw(st.integers(0, min(len(content), 512) - 1 if header else len(content) - 1))
        content[position] ^= 1 << data.draw(st.integers(0, 7))
    _check(run, name, bytes(content))


@FUZZ
@given(name=names, prefix=st.binary(min_size=1, max_size=16), keep=st.booleans())
@example(name=WEIGHTS, prefix=(2**62).to_bytes(8, "little"), keep=True).via("a huge header length")
@example(name=RECORD, prefix=b"[", keep=False).via("a list")
def test_wrong_headers(run: Path, name: str, prefix: bytes, keep: bool) -> None:
    """`prefix` replaces the file's first bytes (keep) or is the whole file."""
    content = _files(run)[name].read_bytes()
    _check(run, name, prefix + content[len(prefix):] if keep else prefix)


def test_a_good_folder_loads(run: Path) -> None:
    _load_all(run)


def test_a_missing_file_is_a_clear_error(run: Path, tmp_path: Path) -> None:
    for name in _files(run):
        copy = tmp_path / name
        shutil.copytree(run, copy)
        _files(copy)[name].unlink()
        with pytest.raises(FastVAEError):
            _load_all(copy)
