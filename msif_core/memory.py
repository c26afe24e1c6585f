"""Keep freed memory in the process, so that large tensors reuse pages instead of faulting in new ones.

glibc serves every allocation above 32 MiB with a fresh ``mmap`` and gives it back on free; the next
batch's tensors of the same size then touch new pages, and the kernel zeroes each one on first touch.
Scoring many queries writes gigabytes of per-sequence gradients per group: at 18.9M parameters, 512
tokens, 64 queries, its pass took 17.3 s without and 11.1 s with this setting (bench/bench_core.py,
``--no-retain-memory``; rows in bench/results/). :func:`retain_freed_memory` switches the process's
allocator to keep freed memory for reuse: resident memory then stays at its peak until the process exits.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_state: dict[str, bool] = {}


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory (no per-allocation ``mmap``, no trimming) for this process.

    Idempotent; returns whether the setting is in force (False off Linux/glibc, where it does nothing).
    Called by msif's entry points (the ``msif`` CLI, the Dagster ``DeviceResource``, ``attribute``,
    bench/bench_core.py); a library user calls it once at start-up.
    """
    if "on" in _state:
        return _state["on"]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # -1 disables trimming (man mallopt); 256 MiB of headroom per heap extension
            ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1)) \
                and bool(mallopt(_M_TOP_PAD, 256 << 20))
        except (OSError, AttributeError):
            ok = False
    log.debug("retain freed memory: %s", ok)
    _state["on"] = ok
    return ok
