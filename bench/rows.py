"""Benchmark rows: printed as JSON and appended to a JSON-lines file under bench/results/."""

from __future__ import annotations

import json
import time
from pathlib import Path


def emit(row: dict, out: str | Path) -> None:
    """Stamp ``row`` with the time, print it, and append it to ``out``."""
    row = {**row, "time": row.get("time") or time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
