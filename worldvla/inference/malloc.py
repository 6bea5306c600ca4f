"""CPU inference and glibc's malloc.

A CPU forward over a prompt allocates and frees tensors of a few MB per op (a 574-token prompt
of the small config: [574, 688] fp32 MLP activations are 1.6 MB). glibc serves blocks above its
mmap threshold with fresh `mmap`s and hands freed memory at the top of the heap back to the
kernel once it exceeds the trim threshold; either way the next allocation of that size faults
its pages in again, one page at a time. Its default thresholds move with the program's history
(the mmap threshold rises to the largest block freed so far), so how often this happens varies
from run to run: up to 9,400 page faults per 5-action chunk at 256 px, and 0-40 with both
thresholds fixed high; 1.04-1.41x on that chunk (benchmarks/NOTES.md has the measurements).

`tune_cpu_malloc` fixes both thresholds high for the whole process: freed blocks stay with the
process and are reused, so its resident memory stays near its peak instead of shrinking between
calls. That is the right trade for a control loop; `WorldVLAPolicy` on the CPU applies it unless
told not to. Blocks above glibc's 32 MiB ceiling for the mmap threshold are still mapped afresh
each time; `mmap=False` serves them from the heap too. Training needs that: a 65,536-entry
embedding's and lm_head's fp32 gradients are 64 MiB each, and a small-config CPU training step on
the Chameleon vocabulary faulted about 170,000 pages in (2,400-4,000 with mmap off, 1.18-1.25x
faster steps); `worldvla train` on the CPU applies it. Launching under jemalloc or tcmalloc (LD_PRELOAD)
has a similar effect.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

from ..checks import is_count

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit builds.
MAX_MMAP_THRESHOLD = 32 << 20

_applied: dict | None = None


def _mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def tune_cpu_malloc(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 1 << 30, *,
                    mmap: bool = True) -> dict | None:
    """Fix glibc's mmap threshold (blocks up to this size come from the heap and are reused) and
    trim threshold (free memory kept at the top of the heap before it goes back to the kernel),
    in bytes, for this whole process; `mmap=False` maps no block on its own at all (every block
    comes from the heap, however large). Returns the settings in force, or None where the C library
    is not glibc (nothing is changed there). Calling it again with other values changes them."""
    global _applied
    for name, value, hi in (("mmap_threshold", mmap_threshold, MAX_MMAP_THRESHOLD),
                            ("trim_threshold", trim_threshold, 2**31 - 1)):
        if not (is_count(value) and value <= hi):
            raise ValueError(f"{name} must be an int number of bytes in [0, {hi}] (glibc's limit), got {value!r}")
    if not isinstance(mmap, bool):
        raise ValueError(f"mmap must be True or False, got {mmap!r}")
    fn = _mallopt()
    if fn is None:
        return None
    # glibc's default cap on mapped blocks (M_MMAP_MAX): 65,536.
    for param, value, name in ((_M_MMAP_THRESHOLD, mmap_threshold, "mmap_threshold"),
                               (_M_TRIM_THRESHOLD, trim_threshold, "trim_threshold"),
                               (_M_MMAP_MAX, 65536 if mmap else 0, "mmap_max")):
        if fn(param, value) != 1:
            raise RuntimeError(f"glibc's mallopt refused {name}={value}")
    _applied = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold, "mmap": mmap}
    return dict(_applied)


def cpu_malloc_settings() -> dict | None:
    """What `tune_cpu_malloc` set in this process, or None if it has not run (glibc's defaults,
    or whatever the environment set: GLIBC_TUNABLES, a preloaded allocator)."""
    return None if _applied is None else dict(_applied)
