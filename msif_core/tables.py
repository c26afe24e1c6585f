"""The long score table and its one rank rule, shared by the API, the pipeline and the SQL views.

A long table has one row per (query_id, doc_id, method) with ``score`` and, for gradient methods,
``mlp_score`` and ``mha_score``. Rank 1 is the most supporting document: **score descending, ties by
doc_id ascending, missing scores last** (:data:`RANK_ORDER_SQL` in SQL, :func:`with_rank` in pandas).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

# NaN scores (Parquet stores them as NaN, which DuckDB would sort above every number) count as missing
RANK_ORDER_SQL = "ORDER BY (CASE WHEN isnan(score) THEN NULL ELSE score END) DESC NULLS LAST, doc_id"
SCORE_COLUMNS = ("query_id", "doc_id", "method", "score", "mlp_score", "mha_score")


def long_table(scores: np.ndarray, doc_ids: Sequence[str], query_ids: Sequence[str], method: str,
               mlp: np.ndarray | None = None, mha: np.ndarray | None = None) -> pd.DataFrame:
    """Rows of a [documents, queries] score matrix, query-major (every document of query 1 first)."""
    n, q = scores.shape
    if (len(doc_ids), len(query_ids)) != (n, q):
        raise ValueError(f"scores are [{n}, {q}] but {len(doc_ids)} doc_ids and {len(query_ids)} query_ids")

    def flat(x: np.ndarray | None) -> np.ndarray | float:
        return np.nan if x is None else np.asarray(x).T.reshape(-1).astype(float)

    return pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), n),
        "doc_id": np.tile(np.asarray(doc_ids, dtype=object), q),
        "method": method, "score": flat(scores), "mlp_score": flat(mlp), "mha_score": flat(mha)})


def with_rank(df: pd.DataFrame, column: str = "rank", within: Sequence[str] = ("query_id", "method")) -> pd.DataFrame:
    """``df`` sorted by ``within`` then the rank rule, with ``column`` = 1, 2, ... in each group."""
    keys = [*within, "score", "doc_id"]
    out = df.sort_values(keys, ascending=[True] * len(within) + [False, True], na_position="last", kind="mergesort")
    out[column] = out.groupby(list(within), sort=False).cumcount().astype("int64") + 1
    return out
