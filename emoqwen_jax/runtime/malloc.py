"""glibc malloc settings for XLA:CPU: keep the step's large scratch buffers mapped between steps.

XLA:CPU allocates one large scratch buffer per executable run (1.77 GB for the ``small`` bench step). With
glibc's defaults such a buffer is served by ``mmap`` and returned to the OS on ``free``, so every step maps and
page-faults it in again (~460k faults, about 1 s per ``small`` step; docs/design.md, glibc malloc and XLA:CPU's
per-step scratch buffer). ``tune_malloc()`` turns that off for this process with ``mallopt`` (one arena, no
mmap-served blocks, no trimming), which has the same effect as starting Python with

    GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

(``GLIBC_ENV`` below; the environment variable must be set before the process starts, ``tune_malloc`` works
from inside it). The training CLI calls it first; set ``EMOQWEN_MALLOC=default`` to keep glibc's behaviour.
Accelerator runs are unaffected (device memory is not malloc's); the host process keeps its peak footprint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

GLIBC_ENV = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc malloc.h


def tune_malloc() -> bool:
    """Applies the settings above via ``mallopt``; False where glibc is absent or ``EMOQWEN_MALLOC=default``."""
    if os.environ.get("EMOQWEN_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(ok)
