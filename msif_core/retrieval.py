"""Candidate pairs: which documents each query scores (SPEC section 6).

Either every document (``all_pairs``) or each query's nearest documents by embedding similarity
(``nearest_pairs``, from the hits of a vector search: the pipeline searches LanceDB). Both give the
columns query_id, doc_id, distance (cosine distance; NaN for all pairs) and neighbour_rank (1 = nearest;
0 when every document is a candidate), ordered by query, then distance, then doc_id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def all_pairs(query_ids: Sequence[str], doc_ids: Sequence[str]) -> pd.DataFrame:
    """Every (query, document) pair."""
    return pd.DataFrame({"query_id": np.repeat(np.asarray(query_ids, dtype=object), len(doc_ids)),
                         "doc_id": np.tile(np.asarray(doc_ids, dtype=object), len(query_ids)),
                         "distance": np.nan, "neighbour_rank": 0})


def nearest_pairs(query_ids: Sequence[str], query_index: np.ndarray, doc_ids: np.ndarray,
                  distances: np.ndarray) -> pd.DataFrame:
    """Pairs from search hits: hit i is document ``doc_ids[i]`` at ``distances[i]`` for query
    ``query_ids[query_index[i]]``; ranked per query by distance, ties by doc_id."""
    hits = pd.DataFrame({"query_index": np.asarray(query_index), "doc_id": np.asarray(doc_ids, dtype=object),
                         "distance": np.asarray(distances)})
    hits = hits.sort_values(["query_index", "distance", "doc_id"])
    out = pd.DataFrame({"query_id": np.asarray(query_ids, dtype=object)[hits.query_index.to_numpy()],
                        "doc_id": hits.doc_id.to_numpy(), "distance": hits.distance.to_numpy()})
    out["neighbour_rank"] = out.groupby("query_id").cumcount() + 1
    return out
