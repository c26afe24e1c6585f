"""Keep freed memory in the process, so that large tensors reuse pages instead of faulting in new ones.

glibc serves every allocation above 32 MiB with a fresh ``mmap`` and gives it back on free; the next
batch's tensors of the same size then touch new pages, and the kernel zeroes each one on first touch.
Scoring many queries writes gigabytes of per-sequence gradients per group: at 18.9M parameters, 512
tokens, 64 queries, its pass took 17.3 s without and 11.1 s with this setting (bench/bench_core.py,
``--no-retain-memory``; rows in bench/results/). :func:`retain_freed_memory` switches the process's
allocator to keep freed memory for reuse: resident memory then stays at its peak until the process exits.
:func:`available_memory` says how much memory a device has free (the EK-FAC fit sizes its pass cache by it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

import torch

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


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far, in bytes (``ru_maxrss``; 0 where unavailable)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# (limit, usage) files of the process's memory cgroup: v2, then v1
CGROUP_MEMORY_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _cgroup_headroom() -> int | None:
    """Bytes left under this container's memory limit (limit − usage), None where there is no limit."""
    for limit_file, usage_file in CGROUP_MEMORY_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # v1 writes a huge number for none
            return None
        return max(0, int(limit) - usage)
    return None


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes of memory available on ``device`` now: free GPU memory for CUDA; for the CPU the kernel's
    ``MemAvailable`` (free plus reclaimable), within the container's memory limit where there is one
    (a container's /proc/meminfo shows the host's memory); None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    sizes = [x for x in (_host_available(), _cgroup_headroom()) if x is not None]
    return min(sizes) if sizes else None
