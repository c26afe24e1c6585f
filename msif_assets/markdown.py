"""Markdown tables for asset metadata and reports (no extra dependency)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def md_table(df: pd.DataFrame, floatfmt: str = ".4g", max_rows: int = 50) -> str:
    """A Markdown table of the first ``max_rows`` rows of ``df``."""
    df = df.head(max_rows)

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return "" if math.isnan(x) else format(x, floatfmt)
        return str(x).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(cell(x) for x in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])
