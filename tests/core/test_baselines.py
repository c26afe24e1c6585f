"""Baselines: word-level BM25 against a brute-force formula, RepSim against a manual computation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

from msif_core.baselines import bm25_scores, repsim_scores, word_tokenize
from msif_core.data import Encoded

DOCS = [
    "Alice Smith was born in Paris.",
    "Paris is the capital of France; Paris, Paris!",
    "Bob Jones was born in Lyon, France.",
    "The cat sat on the mat.",
    "",
    "Bob's favourite city: PARIS. Bob-Jones lives in Rome",
]
QUERIES = [
    "Where was Alice Smith born? Paris",
    "Where was Bob Jones born? Lyon",
    "capital capital of France",
    "act",  # only characters shared with 'cat': a character-level BM25 would score it
    "zzz unknown words",
]


def _brute_bm25(docs, queries, k1, b, method, delta=0.5):
    toks = [word_tokenize(d) for d in docs]
    n = len(toks)
    avg = sum(len(t) for t in toks) / n
    df = Counter(w for t in toks for w in set(t))
    out = np.zeros((n, len(queries)))
    for j, q in enumerate(queries):
        for i, t in enumerate(toks):
            tf = Counter(t)
            norm = k1 * (1 - b + b * len(t) / avg)
            s = 0.0
            for w in word_tokenize(q):
                if df[w] == 0:
                    continue
                f = tf[w]
                if method == "lucene":
                    s += math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5)) * f / (f + norm)
                elif method == "robertson":
                    s += math.log(max(1.0, (n - df[w] + 0.5) / (df[w] + 0.5))) * f / (f + norm)
                elif method == "bm25+":  # rank-bm25's BM25Plus
                    s += math.log((n + 1) / df[w]) * (delta + (k1 + 1) * f / (f + norm))
                else:
                    raise AssertionError(method)
            out[i, j] = s
    return out


def test_word_tokenize():
    assert word_tokenize("Bob's favourite city: PARIS. Bob-Jones_x 42") == [
        "bob", "s", "favourite", "city", "paris", "bob", "jones", "x", "42"]
    assert word_tokenize("Zoë Ångström") == ["zoë", "ångström"]
    assert word_tokenize("  ,; ") == []


@pytest.mark.parametrize("method,k1,b", [("lucene", 1.5, 0.75), ("lucene", 1.2, 0.3), ("robertson", 1.5, 0.75)])
def test_bm25_matches_brute_force(method, k1, b):
    got = bm25_scores(DOCS, QUERIES, k1=k1, b=b, method=method)
    assert got.shape == (len(DOCS), len(QUERIES)) and got.dtype == np.float64
    np.testing.assert_allclose(got, _brute_bm25(DOCS, QUERIES, k1, b, method), rtol=1e-10, atol=1e-12)


def test_bm25_plus_matches_rank_bm25_formula():
    got = bm25_scores(DOCS, QUERIES, method="bm25+", delta=1.0)
    # bm25s adds delta·idf for every query word also where the document lacks it (its non-occurrence
    # array), so the whole BM25Plus sum of rank-bm25 (the paper's implementation) is reproduced.
    np.testing.assert_allclose(got, _brute_bm25(DOCS, QUERIES, 1.5, 0.75, "bm25+", delta=1.0), rtol=1e-10)


def test_bm25_is_word_level():
    s = bm25_scores(DOCS, QUERIES)
    assert np.all(s[:, 3] == 0)  # "act" is no word of "The cat sat on the mat."
    assert np.all(s[:, 4] == 0)  # unknown words
    assert np.all(s[4] == 0)  # empty document
    assert s[:, 0].argmax() == 0 and s[:, 1].argmax() == 2 and s[:, 2].argmax() == 1
    # a repeated query word counts again
    once, twice = bm25_scores(DOCS, ["capital of France", "capital capital of France"]).T
    assert np.all(twice >= once) and twice[1] > once[1]
    assert bm25_scores([], ["x"]).shape == (0, 1) and bm25_scores(["", " "], ["x"]).tolist() == [[0.0], [0.0]]
    with pytest.raises(ValueError, match="method"):
        bm25_scores(DOCS, QUERIES, method="bm26")


def _neox(seed: int, cls=GPTNeoXForCausalLM, **kw):
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=37, max_position_embeddings=64, **kw)
    return cls(cfg).double()


def _enc(n: int, seed: int) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 37, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return Encoded(ids, [[False] + [True] * (len(x) - 1) for x in ids])


def _manual_rep(model, ids):
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    return h.mean(0).numpy()


def test_repsim_equals_manual():
    pt, ft = _neox(0), _neox(1)
    docs, queries = _enc(7, 2), _enc(4, 3)
    got = repsim_scores(ft, pt, None, docs, queries, batch_size=3)
    assert got.shape == (7, 4)
    expected = np.zeros((7, 4))
    for i, d in enumerate(docs.input_ids):
        hd = _manual_rep(pt, d)
        for j, q in enumerate(queries.input_ids):
            hq = _manual_rep(ft, q)
            expected[i, j] = hd @ hq / (np.linalg.norm(hd) * np.linalg.norm(hq))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_repsim_with_classifier_restores_mode():
    pt = _neox(0).eval()
    ft = _neox(1, GPTNeoXForSequenceClassification, num_labels=3)  # no pad_token_id: body only
    ft.train()
    docs, queries = _enc(5, 4), _enc(3, 5)
    got = repsim_scores(ft, pt, None, docs, queries, batch_size=4)
    assert ft.training and not pt.training
    ft.eval()
    hq = np.stack([_manual_rep(ft, q) for q in queries.input_ids])
    hd = np.stack([_manual_rep(pt, d) for d in docs.input_ids])
    expected = (hd / np.linalg.norm(hd, axis=1, keepdims=True)) @ (hq / np.linalg.norm(hq, axis=1,
                                                                                     keepdims=True)).T
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
