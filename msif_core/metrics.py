"""Fact-tracing evaluation (paper section 5.3, appendix E.3; SPEC section 6).

Score matrices are ``[n_docs, n_queries]`` and a higher score means *more supporting*: documents are
ranked by descending score. Ties are broken deterministically by document order (the document that comes
first in ``doc_ids`` ranks first), which is what a stable sort of the negated scores gives.

- MRR: mean over queries of ``1 / rank`` of the first true source; 0 when it ranks beyond ``cutoff``
  (100).
- Recall@k: ``|true ∩ top-k| / |true|`` averaged over queries.
- Reranking (appendix E.3): each query is evaluated among its own candidate set, the union of its true
  sources, the BM25 top-100, 100 random documents containing the answer and 100 random documents.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from msif_core.baselines import word_tokenize

log = logging.getLogger(__name__)

RANKING = "descending"  # recorded in every output: higher score = more supporting


def _query_name(j: int, query_ids: Sequence[Hashable] | None) -> str:
    return f"query {j}" if query_ids is None else f"query {j} ({query_ids[j]!r})"


def _check_scores(scores: np.ndarray, n_docs: int, n_queries: int, what: str = "score matrix") -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape != (n_docs, n_queries):
        raise ValueError(f"{what} has shape {scores.shape}, expected [n_docs, n_queries] = "
                         f"[{n_docs}, {n_queries}] (one row per scored document, one column per query)")
    return scores


def _true_indices(
    doc_ids: Sequence[Hashable],
    true_doc_ids_per_query: Sequence[Collection[Hashable]],
    query_ids: Sequence[Hashable] | None = None,
) -> list[np.ndarray]:
    """Positions in ``doc_ids`` of each query's true sources; clear errors on any mismatch."""
    position: dict[Hashable, int] = {}
    for i, d in enumerate(doc_ids):
        if d in position:
            raise ValueError(f"document id {d!r} appears twice among the scored documents "
                             f"(positions {position[d]} and {i})")
        position[d] = i
    if query_ids is not None and len(query_ids) != len(true_doc_ids_per_query):
        raise ValueError(f"{len(query_ids)} query ids but {len(true_doc_ids_per_query)} queries")
    out = []
    for j, true_ids in enumerate(true_doc_ids_per_query):
        if isinstance(true_ids, str | bytes):
            true_ids = [true_ids]
        true_ids = list(dict.fromkeys(true_ids))  # dedupe, keep order
        if not true_ids:
            raise ValueError(f"{_query_name(j, query_ids)} has no true source document")
        idx = []
        for d in true_ids:
            if d not in position:
                raise ValueError(f"true source {d!r} of {_query_name(j, query_ids)} is not among the "
                                 f"{len(position)} scored document ids")
            idx.append(position[d])
        out.append(np.asarray(sorted(idx), dtype=np.int64))
    return out


def _check_candidates(candidates: Sequence[Sequence[int]], n_docs: int, n_queries: int) -> list[np.ndarray]:
    if len(candidates) != n_queries:
        raise ValueError(f"{len(candidates)} candidate sets but {n_queries} queries")
    out = []
    for j, cand in enumerate(candidates):
        c = np.unique(np.asarray(list(cand), dtype=np.int64))  # sorted: keeps doc order for ties
        if c.size and (c[0] < 0 or c[-1] >= n_docs):
            raise ValueError(f"candidate set of query {j} holds document indices outside [0, {n_docs})")
        out.append(c)
    return out


def _ranked(scores_col: np.ndarray, j: int, query_ids: Sequence[Hashable] | None) -> np.ndarray:
    """Indices into ``scores_col`` by descending score, ties by position (stable sort)."""
    if np.isnan(scores_col).any():
        raise ValueError(f"{_query_name(j, query_ids)} has NaN scores among the documents it ranks")
    return np.argsort(-scores_col, kind="stable")


def first_true_ranks(
    scores: np.ndarray,
    doc_ids: Sequence[Hashable],
    true_doc_ids_per_query: Sequence[Collection[Hashable]],
    *,
    candidates: Sequence[Sequence[int]] | None = None,
    query_ids: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """1-based rank of each query's first (best-ranked) true source, shape ``[n_queries]``.

    With ``candidates`` (document indices per query) a query ranks only its candidates; a true source
    outside its candidates cannot be found, and when none is inside the rank is ``inf``. NaN scores are
    allowed only outside the ranked documents.
    """
    n_queries = len(true_doc_ids_per_query)
    scores = _check_scores(scores, len(doc_ids), n_queries)
    true_idx = _true_indices(doc_ids, true_doc_ids_per_query, query_ids)
    cands = None if candidates is None else _check_candidates(candidates, len(doc_ids), n_queries)
    ranks = np.full(n_queries, np.inf)
    for j in range(n_queries):
        pool = np.arange(len(doc_ids)) if cands is None else cands[j]
        order = pool[_ranked(scores[pool, j], j, query_ids)]
        hits = np.flatnonzero(np.isin(order, true_idx[j]))
        if hits.size:
            ranks[j] = hits[0] + 1
    return ranks


def reciprocal_ranks(
    scores: np.ndarray,
    doc_ids: Sequence[Hashable],
    true_doc_ids_per_query: Sequence[Collection[Hashable]],
    cutoff: int = 100,
    *,
    candidates: Sequence[Sequence[int]] | None = None,
    query_ids: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """Per-query ``1 / rank`` of the first true source, 0 when that rank exceeds ``cutoff``."""
    ranks = first_true_ranks(scores, doc_ids, true_doc_ids_per_query, candidates=candidates,
                             query_ids=query_ids)
    return np.where(ranks <= cutoff, 1.0 / ranks, 0.0)


def mrr(
    scores: np.ndarray,
    doc_ids: Sequence[Hashable],
    true_doc_ids_per_query: Sequence[Collection[Hashable]],
    cutoff: int = 100,
    *,
    candidates: Sequence[Sequence[int]] | None = None,
    query_ids: Sequence[Hashable] | None = None,
) -> float:
    """Mean reciprocal rank of the first true source (0 beyond rank ``cutoff``); see
    :func:`reciprocal_ranks` for the per-query values."""
    return float(np.mean(reciprocal_ranks(scores, doc_ids, true_doc_ids_per_query, cutoff,
                                          candidates=candidates, query_ids=query_ids)))


def recalls_at_k(
    scores: np.ndarray,
    doc_ids: Sequence[Hashable],
    true_doc_ids_per_query: Sequence[Collection[Hashable]],
    k: int = 10,
    *,
    candidates: Sequence[Sequence[int]] | None = None,
    query_ids: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """Per-query ``|true ∩ top-k| / |true|`` (the denominator counts every true source, also those
    outside a query's candidate set)."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    n_queries = len(true_doc_ids_per_query)
    scores = _check_scores(scores, len(doc_ids), n_queries)
    true_idx = _true_indices(doc_ids, true_doc_ids_per_query, query_ids)
    cands = None if candidates is None else _check_candidates(candidates, len(doc_ids), n_queries)
    out = np.zeros(n_queries)
    for j in range(n_queries):
        pool = np.arange(len(doc_ids)) if cands is None else cands[j]
        top = pool[_ranked(scores[pool, j], j, query_ids)[:k]]
        out[j] = np.isin(true_idx[j], top).sum() / true_idx[j].size
    return out


def recall_at_k(
    scores: np.ndarray,
    doc_ids: Sequence[Hashable],
    true_doc_ids_per_query: Sequence[Collection[Hashable]],
    k: int = 10,
    *,
    candidates: Sequence[Sequence[int]] | None = None,
    query_ids: Sequence[Hashable] | None = None,
) -> float:
    """Mean over queries of :func:`recalls_at_k`."""
    return float(np.mean(recalls_at_k(scores, doc_ids, true_doc_ids_per_query, k,
                                      candidates=candidates, query_ids=query_ids)))


def _query_fields(q: Any) -> tuple[str, Collection[Hashable]]:
    if isinstance(q, Mapping):
        return str(q["answer"]), q["true_doc_ids"]
    return str(q.answer), q.true_doc_ids


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    if n == 0 or n > len(words):
        return False
    first = phrase[0]
    return any(words[i] == first and words[i:i + n] == phrase for i in range(len(words) - n + 1))


def reranking_candidates(
    doc_ids: Sequence[Hashable],
    doc_texts: Sequence[str],
    queries: Sequence[Any] | pd.DataFrame,
    bm25: np.ndarray,
    rng: np.random.Generator | int | None,
    *,
    n_bm25: int = 100,
    n_answer: int = 100,
    n_random: int = 100,
) -> list[list[int]]:
    """Candidate document indices per query for the reranking evaluation (paper appendix E.3).

    Candidates of query ``j`` = its true sources ∪ its BM25 top-``n_bm25`` ∪ ``n_answer`` random
    documents containing its answer ∪ ``n_random`` random documents, each part capped by how many
    documents there are. A document contains the answer when the answer's words (:func:`word_tokenize`)
    appear consecutively among its words.

    Args:
        doc_ids, doc_texts: the corpus, aligned.
        queries: per query its ``answer`` and ``true_doc_ids`` (mappings, objects with these attributes,
            or a DataFrame with these columns), in the column order of ``bm25``.
        bm25: BM25 scores ``[n_docs, n_queries]`` (:func:`msif_core.baselines.bm25_scores`).
        rng: a numpy Generator or a seed; draws the random parts.

    Returns:
        per query a sorted list of document indices (positions in ``doc_ids``).
    """
    if len(doc_ids) != len(doc_texts):
        raise ValueError(f"{len(doc_ids)} document ids but {len(doc_texts)} document texts")
    if isinstance(queries, pd.DataFrame):
        queries = queries.to_dict("records")
    fields = [_query_fields(q) for q in queries]
    n_docs, n_queries = len(doc_ids), len(fields)
    bm25 = _check_scores(bm25, n_docs, n_queries, "BM25 matrix")
    true_idx = _true_indices(doc_ids, [f[1] for f in fields])
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    doc_words = [word_tokenize(t) for t in doc_texts]
    answer_docs: dict[tuple[str, ...], np.ndarray] = {}
    out: list[list[int]] = []
    for j, (answer, _) in enumerate(fields):
        cand = set(true_idx[j].tolist())
        cand.update(_ranked(bm25[:, j], j, None)[:n_bm25].tolist())
        key = tuple(word_tokenize(answer))
        if key not in answer_docs:
            answer_docs[key] = np.asarray([i for i, w in enumerate(doc_words) if _contains(w, list(key))],
                                          dtype=np.int64)
        with_answer = answer_docs[key]
        if with_answer.size:
            cand.update(rng.choice(with_answer, size=min(n_answer, with_answer.size), replace=False).tolist())
        cand.update(rng.choice(n_docs, size=min(n_random, n_docs), replace=False).tolist())
        out.append(sorted(cand))
    if out:
        sizes = [len(c) for c in out]
        log.info("reranking candidates: %d queries, %.1f documents each on average (min %d, max %d) of %d",
                 n_queries, float(np.mean(sizes)), min(sizes), max(sizes), n_docs)
    return out


def per_query_metrics(
    method_scores: Mapping[str, np.ndarray],
    doc_ids: Sequence[Hashable],
    true_doc_ids_per_query: Sequence[Collection[Hashable]],
    *,
    candidates: Sequence[Sequence[int]] | None = None,
    cutoff: int = 100,
    k: int = 10,
    query_ids: Sequence[Hashable] | None = None,
) -> pd.DataFrame:
    """One row per (method, setting, query): first true rank, reciprocal rank and recall@k.

    ``setting`` is ``"all"`` (every document ranked) and, when ``candidates`` is given, also
    ``"rerank"`` (each query ranks only its candidates).
    """
    rows = []
    settings: list[tuple[str, Sequence[Sequence[int]] | None]] = [("all", None)]
    if candidates is not None:
        settings.append(("rerank", candidates))
    for name, scores in method_scores.items():
        for setting, cand in settings:
            try:
                ranks = first_true_ranks(scores, doc_ids, true_doc_ids_per_query, candidates=cand,
                                         query_ids=query_ids)
                rec = recalls_at_k(scores, doc_ids, true_doc_ids_per_query, k, candidates=cand,
                                   query_ids=query_ids)
            except ValueError as e:
                raise ValueError(f"method {name!r}: {e}") from e
            for j in range(len(true_doc_ids_per_query)):
                rows.append({
                    "method": name,
                    "setting": setting,
                    "query": j,
                    "query_id": None if query_ids is None else query_ids[j],
                    "first_true_rank": ranks[j],
                    "reciprocal_rank": 1.0 / ranks[j] if ranks[j] <= cutoff else 0.0,
                    f"recall_at_{k}": rec[j],
                    "ranking": RANKING,
                })
    return pd.DataFrame(rows)


def evaluate_rankings(
    method_scores: Mapping[str, np.ndarray],
    doc_ids: Sequence[Hashable],
    true_doc_ids_per_query: Sequence[Collection[Hashable]],
    *,
    candidates: Sequence[Sequence[int]] | None = None,
    cutoff: int = 100,
    k: int = 10,
    query_ids: Sequence[Hashable] | None = None,
) -> pd.DataFrame:
    """MRR and Recall@k of every method, one row per method (in the order given).

    Columns: ``method``, ``n_queries``, ``n_docs``, ``mrr``, ``recall_at_{k}`` (every document ranked)
    and, with ``candidates``, ``mrr_rerank``, ``recall_at_{k}_rerank`` and ``mean_candidates``;
    ``ranking`` = ``"descending"`` (higher score = more supporting). Raises ValueError when a score
    matrix's shape does not match ``[len(doc_ids), n_queries]`` or a true source id is not among
    ``doc_ids`` (naming the method, the query and the id).
    """
    n_queries = len(true_doc_ids_per_query)
    if n_queries == 0:
        raise ValueError("no queries to evaluate")
    long = per_query_metrics(method_scores, doc_ids, true_doc_ids_per_query, candidates=candidates,
                             cutoff=cutoff, k=k, query_ids=query_ids)
    rec = f"recall_at_{k}"
    rows = []
    for name in method_scores:
        row: dict[str, Any] = {"method": name, "n_queries": n_queries, "n_docs": len(doc_ids)}
        for setting, suffix in (("all", ""), ("rerank", "_rerank")):
            part = long[(long["method"] == name) & (long["setting"] == setting)]
            if len(part):
                row["mrr" + suffix] = float(part["reciprocal_rank"].mean())
                row[rec + suffix] = float(part[rec].mean())
        if candidates is not None:
            row["mean_candidates"] = float(np.mean([len(set(c)) for c in candidates]))
        row["ranking"] = RANKING
        rows.append(row)
        log.info("%s: %s", name, ", ".join(f"{c}={v:.4f}" for c, v in row.items()
                                            if c.startswith(("mrr", "recall")) and isinstance(v, float)))
    return pd.DataFrame(rows)
