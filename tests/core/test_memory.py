"""msif_core.memory: the allocator setting takes on Linux/glibc and is idempotent; results do not change."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import ctypes, torch
from msif_core.memory import retain_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info
def mapped_for_a_big_tensor():
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: above glibc's largest mmap threshold
    n = mallinfo2().hblks
    del x
    return n - mallinfo2().hblks
before = mapped_for_a_big_tensor()
print(retain_freed_memory(), retain_freed_memory(), before, mapped_for_a_big_tensor())
"""


def test_retain_freed_memory_stops_mapping_large_blocks():
    """In a fresh process: a 64 MiB tensor is its own mmap before the call and comes from the heap
    (which keeps freed pages) after it; a second call is a no-op that reports the same."""
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "1", "0"], out
