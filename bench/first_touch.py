"""Cost of the first touch of new memory on this machine: why a fit's first run in a process is slower.

Run:  .venv/bin/python bench/first_touch.py [--gib 2] [--repeat 3]

In a fresh process, writes ``--gib`` GiB of newly allocated memory (``torch.empty`` + ``fill_``: the
kernel hands out and zeroes each page on first write), then writes the same memory again (no page
faults). The difference, per GiB, is what the fit's cold column pays for the memory its pass cache and
per-batch tensors take on first use. Prints one JSON line (system and wall seconds per GiB, both ways).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, system CPU seconds) of ``fn()``."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - t0, r1.ru_stime - r0.ru_stime


def main() -> None:
    """Measure and print the per-GiB costs (best of ``--repeat`` fresh allocations)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = int(args.gib * 2**30) // 4
    first, again = [], []
    for _ in range(args.repeat):
        x = torch.empty(n, dtype=torch.float32)  # large: its own mapping, returned to the kernel when freed
        first.append(_timed(lambda x=x: x.fill_(1.0)))
        again.append(_timed(lambda x=x: x.fill_(2.0)))
        del x
    best = min(first), min(again)
    print(json.dumps({"gib": args.gib, "first_touch_wall_s_per_gib": round(best[0][0] / args.gib, 3),
                      "first_touch_sys_s_per_gib": round(best[0][1] / args.gib, 3),
                      "rewrite_wall_s_per_gib": round(best[1][0] / args.gib, 3),
                      "rewrite_sys_s_per_gib": round(best[1][1] / args.gib, 3)}))


if __name__ == "__main__":
    main()
