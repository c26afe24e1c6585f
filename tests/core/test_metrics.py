"""Fact-tracing metrics on hand-made cases: ties, cutoffs, candidate sets, reranking, error cases."""

from __future__ import annotations

import numpy as np
import pytest

from msif_core.baselines import bm25_scores
from msif_core.metrics import (
    evaluate_rankings,
    first_true_ranks,
    mrr,
    per_query_metrics,
    recall_at_k,
    recalls_at_k,
    reciprocal_ranks,
    reranking_candidates,
)

DOC_IDS = ["d0", "d1", "d2", "d3", "d4"]
# columns = queries
SCORES = np.array([
    [0.1, 1.0, 3.0],
    [0.9, 1.0, 2.0],
    [0.5, 1.0, 1.0],
    [0.5, 1.0, 0.0],
    [0.0, 1.0, -1.0],
])
TRUE = [{"d3"}, ["d4", "d0"], ("d2",)]


def test_ranks_with_ties_by_document_order():
    # q0: d1, then d2 and d3 tie at 0.5 -> d2 first (doc order) -> d3 at rank 3
    # q1: all tied -> doc order -> d0 at rank 1; q2: d0, d1, d2 -> rank 3
    np.testing.assert_array_equal(first_true_ranks(SCORES, DOC_IDS, TRUE), [3, 1, 3])
    np.testing.assert_allclose(reciprocal_ranks(SCORES, DOC_IDS, TRUE), [1 / 3, 1, 1 / 3])
    assert mrr(SCORES, DOC_IDS, TRUE) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    # beyond the cutoff the reciprocal rank is 0
    np.testing.assert_allclose(reciprocal_ranks(SCORES, DOC_IDS, TRUE, cutoff=2), [0, 1, 0])
    assert mrr(SCORES, DOC_IDS, TRUE, cutoff=2) == pytest.approx(1 / 3)


def test_recall_at_k():
    np.testing.assert_allclose(recalls_at_k(SCORES, DOC_IDS, TRUE, k=2), [0, 0.5, 0])
    np.testing.assert_allclose(recalls_at_k(SCORES, DOC_IDS, TRUE, k=3), [1, 0.5, 1])
    np.testing.assert_allclose(recalls_at_k(SCORES, DOC_IDS, TRUE, k=5), [1, 1, 1])
    assert recall_at_k(SCORES, DOC_IDS, TRUE, k=2) == pytest.approx(0.5 / 3)
    assert recall_at_k(SCORES, DOC_IDS, TRUE) == 1.0  # default k = 10 > n_docs
    with pytest.raises(ValueError, match="positive"):
        recalls_at_k(SCORES, DOC_IDS, TRUE, k=0)


def test_candidate_restriction():
    cands = [[3, 0], [4, 2], [2, 4, 0]]
    scores = SCORES.copy()
    scores[1, 0] = np.nan  # NaN outside a query's candidates is ignored
    np.testing.assert_array_equal(first_true_ranks(scores, DOC_IDS, TRUE, candidates=cands), [1, 2, 2])
    # q1: top-1 of {d2, d4} is d2 (tie, doc order); recall counts both true sources in the denominator
    np.testing.assert_allclose(recalls_at_k(scores, DOC_IDS, TRUE, k=1, candidates=cands), [1, 0, 0])
    np.testing.assert_allclose(recalls_at_k(scores, DOC_IDS, TRUE, k=2, candidates=cands), [1, 0.5, 1])
    # a query whose candidates hold no true source: never found
    assert first_true_ranks(SCORES, DOC_IDS, TRUE, candidates=[[0], [0], [1]])[2] == np.inf
    assert reciprocal_ranks(SCORES, DOC_IDS, TRUE, candidates=[[0], [0], [1]])[2] == 0.0
    with pytest.raises(ValueError, match="outside"):
        first_true_ranks(SCORES, DOC_IDS, TRUE, candidates=[[0], [5], [1]])
    with pytest.raises(ValueError, match="candidate sets"):
        first_true_ranks(SCORES, DOC_IDS, TRUE, candidates=[[0]])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"true source 'dX' of query 1 \('q-b'\)"):
        mrr(SCORES, DOC_IDS, [{"d3"}, {"dX"}, {"d2"}], query_ids=["q-a", "q-b", "q-c"])
    with pytest.raises(ValueError, match="true source 3 of query 0"):
        mrr(SCORES, DOC_IDS, [{3}, {"d0"}, {"d2"}])  # ids are compared as given: 3 != "d3"
    with pytest.raises(ValueError, match=r"shape \(5, 2\).*\[5, 3\]"):
        mrr(SCORES[:, :2], DOC_IDS, TRUE)
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*\[5, 3\]"):
        recall_at_k(SCORES[:4], DOC_IDS, TRUE)
    with pytest.raises(ValueError, match="appears twice"):
        mrr(SCORES, ["d0", "d1", "d2", "d1", "d4"], TRUE)
    with pytest.raises(ValueError, match="no true source"):
        mrr(SCORES, DOC_IDS, [{"d3"}, set(), {"d2"}])
    nan = SCORES.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="query 2 has NaN"):
        mrr(nan, DOC_IDS, TRUE)
    with pytest.raises(ValueError, match="method 'bad'"):
        evaluate_rankings({"good": SCORES, "bad": SCORES.T}, DOC_IDS, TRUE)


def test_evaluate_rankings_table():
    rng = np.random.default_rng(0)
    methods = {"perfect": SCORES * 0 + np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]]),
               "given": SCORES, "random": rng.normal(size=SCORES.shape)}
    cands = [[3, 0], [4, 2], [2, 4, 0]]
    df = evaluate_rankings(methods, DOC_IDS, TRUE, candidates=cands, k=2)
    assert list(df["method"]) == ["perfect", "given", "random"]
    assert {"mrr", "recall_at_2", "mrr_rerank", "recall_at_2_rerank", "mean_candidates", "ranking",
            "n_queries", "n_docs"} <= set(df.columns)
    row = df.set_index("method").loc["given"]
    assert row["mrr"] == pytest.approx(mrr(SCORES, DOC_IDS, TRUE))
    assert row["recall_at_2"] == pytest.approx(recall_at_k(SCORES, DOC_IDS, TRUE, k=2))
    assert row["mrr_rerank"] == pytest.approx(mrr(SCORES, DOC_IDS, TRUE, candidates=cands))
    assert row["mean_candidates"] == pytest.approx(7 / 3) and row["ranking"] == "descending"
    assert df.set_index("method").loc["perfect", "mrr"] == 1.0
    plain = evaluate_rankings({"given": SCORES}, DOC_IDS, TRUE)
    assert "mrr_rerank" not in plain.columns and plain.loc[0, "recall_at_10"] == 1.0
    long = per_query_metrics({"given": SCORES}, DOC_IDS, TRUE, candidates=cands)
    assert len(long) == 6 and set(long["setting"]) == {"all", "rerank"}


def _corpus(n_docs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(60)]
    texts = []
    for i in range(n_docs):
        text = " ".join(rng.choice(words, size=8))
        if i % 3 == 0:
            text += " the blue-whale swims"  # contains the answer "Blue Whale"
        elif i % 3 == 1:
            text += " blue and whale bluewhale"  # words present, but not the answer phrase
        texts.append(text)
    return [f"doc{i}" for i in range(n_docs)], texts


def test_reranking_candidates_protocol():
    doc_ids, texts = _corpus(600)
    queries = [{"answer": "Blue Whale", "true_doc_ids": ["doc4", "doc7"]},
               {"answer": "w3", "true_doc_ids": ["doc10"]}]
    qtexts = ["what is big? Blue Whale", "which w? w3"]
    bm25 = bm25_scores(texts, qtexts)
    cands = reranking_candidates(doc_ids, texts, queries, bm25, 0)
    assert len(cands) == 2
    answer_docs = {i for i in range(600) if i % 3 == 0}
    for j, c in enumerate(cands):
        assert c == sorted(set(c))
        true = {doc_ids.index(d) for d in queries[j]["true_doc_ids"]}
        assert true <= set(c)
        top = set(np.argsort(-bm25[:, j], kind="stable")[:100].tolist())
        assert top <= set(c)
        assert len(c) <= len(true) + 300
    assert len(answer_docs & set(cands[0])) >= 100
    assert len(set(cands[0]) - answer_docs - set(np.argsort(-bm25[:, 0], kind="stable")[:100].tolist())) <= 102
    only_answer = reranking_candidates(doc_ids, texts, queries, bm25, 0, n_bm25=0, n_random=0)
    assert len(set(only_answer[0]) & answer_docs) == 100
    assert set(only_answer[0]) - answer_docs == {4, 7} - answer_docs
    with_w3 = {i for i, t in enumerate(texts) if "w3" in t.split()}
    assert set(only_answer[1]) == with_w3 | {10} or (len(with_w3) > 100 and set(only_answer[1]) <= with_w3 | {10})
    assert reranking_candidates(doc_ids, texts, queries, bm25, 0) == cands  # seeded: reproducible
    assert reranking_candidates(doc_ids, texts, queries, bm25, np.random.default_rng(1)) != cands


def test_reranking_candidates_small_corpus_and_errors():
    doc_ids, texts = _corpus(40)
    queries = [{"answer": "Blue Whale", "true_doc_ids": ["doc4"]}]
    bm25 = bm25_scores(texts, ["Blue Whale"])
    assert reranking_candidates(doc_ids, texts, queries, bm25, 0) == [list(range(40))]  # capped
    with pytest.raises(ValueError, match="'nope' of query 0"):
        reranking_candidates(doc_ids, texts, [{"answer": "x", "true_doc_ids": ["nope"]}], bm25, 0)
    with pytest.raises(ValueError, match="BM25 matrix has shape"):
        reranking_candidates(doc_ids, texts, queries, bm25.T, 0)
