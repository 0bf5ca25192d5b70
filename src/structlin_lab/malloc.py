"""Opt-in tuning of glibc's allocator for CPU training.

PyTorch's CPU allocator hands large tensors to ``malloc``, and glibc serves every block above
``M_MMAP_THRESHOLD`` (at most 32 MiB) with a fresh ``mmap`` that is returned to the OS on free.
Each training step then page-faults and zero-fills its activations again. Structured layers make
more, smaller intermediates than one dense matmul, so they suffer more: in our measurements this
cost up to half of a BTT layer's step time at ``d=4096`` (benchmarks/RESULTS.md). Intel's PyTorch
CPU guide recommends a caching allocator (jemalloc/tcmalloc via ``LD_PRELOAD``) for the same
reason; :func:`tune_malloc` is the no-install equivalent. It changes process-wide state, so the
library never calls it by itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_malloc(keep_bytes: int = 1 << 32) -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it.

    Sets ``M_MMAP_MAX = 0`` (no per-allocation ``mmap``) and ``M_TRIM_THRESHOLD = keep_bytes``.
    Returns True when applied, False on platforms without glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    keep = min(int(keep_bytes), 2**31 - 1)
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, keep))
