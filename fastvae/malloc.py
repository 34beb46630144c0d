"""glibc malloc settings for CPU training: keep freed memory in the process for the next step, instead of
unmapping every large block on free and page-faulting it back in (zeroed) on the next step."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters, from glibc's malloc.h
_MAX_INT = 2**31 - 1
_MIB = 2**20
ALLOCATORS = ("cached", "system")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # present in glibc only; musl and macOS have no mallopt to tune  # noqa: B018
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def keep_freed_memory() -> str | None:
    """Make glibc keep freed memory (no mmap for large blocks, no trimming); None when done, else why not.

    Process-wide: call it in a process that trains, not in a library import. The cost is that the process keeps
    its peak heap until it exits, as PyTorch's CUDA caching allocator does.
    """
    # NOTE: a batch-1024 step allocates several hundred MB of large tensors. On a 2-core Xeon a 75 MB copy took
    # 19.7 ms into fresh memory and 6.1 into reused memory, and fastvae's eager step 365 ms with glibc's
    # defaults against 232 ms with this setting (docs/performance.md).
    libc = _glibc()
    if libc is None:
        return "not glibc: nothing to tune"
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _MAX_INT)):
        return "glibc refused mallopt"
    return None


def return_freed_memory() -> None:
    """Undo `keep_freed_memory` (for benchmarks that compare both settings in one process): mmap and trimming
    as glibc does them by default once its adaptive threshold has reached its 32 MiB ceiling, which a training
    process reaches in its first step; then hand the kept memory back."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * _MIB)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * _MIB)
    trim()


def trim() -> None:
    """Hand the memory malloc holds but nothing uses back to the system (a memory probe's baseline)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
