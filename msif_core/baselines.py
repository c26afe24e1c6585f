"""Model-free and similarity baselines for fact tracing: word-level BM25 and representation similarity.

Both return a score matrix of shape ``[n_docs, n_queries]`` where a higher score means the document is
ranked as more supporting (rank descending), like every other method in msif.

- :func:`bm25_scores` is *word-level* BM25 (paper appendix D.1) computed with the ``bm25s`` library. Texts
  are split into lower-cased words (:func:`word_tokenize`) and bm25s is given integer word ids, never raw
  strings (SPEC section 5: a published benchmark gave BM25 character lists instead of words).
- :func:`repsim_scores` is the cosine between the mean-pooled last hidden state of the fine-tuned model on
  the query and of the pre-trained model on the document (paper appendix D.2, SPEC section 1).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import bm25s
import numpy as np
import torch

from msif_core.data import Encoded, iter_batches, pad_id_of

log = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+")

BM25_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


def word_tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words: maximal runs of letters and digits (Unicode aware).

    Everything else (spaces, punctuation, underscores) separates words.
    """
    return _WORD.findall(text.lower())


def bm25_scores(
    doc_texts: Sequence[str],
    query_texts: Sequence[str],
    *,
    k1: float = 1.5,
    b: float = 0.75,
    method: str = "lucene",
    delta: float = 0.5,
) -> np.ndarray:
    """Word-level BM25 score of every document against every query, shape ``[n_docs, n_queries]``.

    Documents and queries are tokenised with :func:`word_tokenize`; bm25s indexes the documents'
    integer word ids. A query word that occurs several times counts several times; words absent from
    every document contribute nothing.

    ``method`` picks the bm25s variant and is set explicitly (bm25s's own default is ``"lucene"``):
    ``lucene`` scores ``Σ_{t∈q} log(1 + (N − df_t + 0.5)/(df_t + 0.5)) · f/(f + k1·(1 − b + b·L/L_avg))``
    with ``f`` the count of ``t`` in the document, ``L`` its length in words and ``N`` the number of
    documents (the usual ``k1 + 1`` numerator factor is omitted: a constant, rankings are unchanged).
    ``method="bm25+"`` with ``delta=1`` reproduces rank-bm25's BM25Plus, the implementation the paper
    used: ``Σ_t log((N + 1)/df_t) · (delta + (k1 + 1)·f/(f + k1·(1 − b + b·L/L_avg)))``.

    Args:
        doc_texts: the candidate documents.
        query_texts: the query texts (for fact tracing: prompt + completion).
        k1, b: BM25 term-frequency saturation and length normalisation.
        method: one of ``"lucene"``, ``"robertson"``, ``"atire"``, ``"bm25l"``, ``"bm25+"``.
        delta: the lower bound of BM25L / BM25+ (ignored by the other methods).

    Returns:
        float64 array ``[n_docs, n_queries]``; higher = more relevant.
    """
    if method not in BM25_METHODS:
        raise ValueError(f"unknown BM25 method {method!r}; choose from {BM25_METHODS}")
    n_docs, n_queries = len(doc_texts), len(query_texts)
    out = np.zeros((n_docs, n_queries), dtype=np.float64)
    if n_docs == 0 or n_queries == 0:
        return out

    vocab: dict[str, int] = {}
    doc_ids: list[list[int]] = []
    for text in doc_texts:
        doc_ids.append([vocab.setdefault(w, len(vocab)) for w in word_tokenize(text)])
    if not vocab:
        log.warning("BM25: none of the %d documents contains a word; every score is 0", n_docs)
        return out

    retriever = bm25s.BM25(k1=k1, b=b, delta=delta, method=method, dtype="float64")
    # A (token-id lists, vocabulary) tuple: bm25s then works on our word ids and never sees a raw string.
    retriever.index((doc_ids, dict(vocab)), create_empty_token=False, show_progress=False)

    n_empty = 0
    for j, text in enumerate(query_texts):
        ids = [vocab[w] for w in word_tokenize(text) if w in vocab]
        if not ids:
            n_empty += 1
            continue
        out[:, j] = retriever.get_scores_from_ids(ids)
    if n_empty:
        log.warning("BM25: %d of %d queries share no word with any document (all their scores are 0)",
                    n_empty, n_queries)
    log.info("BM25 (%s, k1=%g, b=%g): %d documents, %d distinct words, %d queries",
             method, k1, b, n_docs, len(vocab), n_queries)
    return out


@contextmanager
def _eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the duration, then restore each one's training flag."""
    flags = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def mean_pooled_hidden_states(model: torch.nn.Module, encoded: Encoded, batch_size: int = 16,
                              pad_id: int = 0) -> np.ndarray:
    """Mean over non-padding tokens of the model's last hidden state, one row per example.

    The hidden state is ``hidden_states[-1]`` of the model's transformer body (``model.base_model``,
    called with ``output_hidden_states=True``), so causal-LM and sequence-classification models give the
    same representation and no head is run. Returns float64 ``[n_examples, hidden_size]`` in the order of
    ``encoded``.
    """
    body = getattr(model, "base_model", model)
    device = _device_of(model)
    out: np.ndarray | None = None
    with _eval_mode(model):
        for batch in iter_batches(encoded, batch_size, pad_id=pad_id):
            batch = batch.to(device)
            res = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       output_hidden_states=True)
            hidden = res.hidden_states[-1].to(torch.float64)
            att = batch.attention_mask.to(torch.float64).unsqueeze(-1)
            pooled = (hidden * att).sum(1) / att.sum(1).clamp_min(1.0)
            if out is None:
                out = np.zeros((len(encoded), pooled.shape[-1]), dtype=np.float64)
            out[batch.index] = pooled.cpu().numpy()
    if out is None:
        return np.zeros((0, 0), dtype=np.float64)
    return out


def repsim_scores(
    ft_model: torch.nn.Module,
    pt_model: torch.nn.Module,
    tokenizer,
    doc_encoded: Encoded,
    query_encoded: Encoded,
    batch_size: int = 16,
) -> np.ndarray:
    """Representation similarity, shape ``[n_docs, n_queries]`` (SPEC section 1, paper appendix D.2).

    ``score[i, j] = cosine(h_pt(doc_i), h_ft(query_j))`` where ``h`` is the last hidden state mean-pooled
    over the example's non-padding tokens (for a query: prompt and completion tokens alike), computed
    with θ_pt on documents and θ_ft on queries. A zero representation gives a cosine of 0.

    Args:
        ft_model: the fine-tuned model θ_ft (causal LM or sequence classifier).
        pt_model: the pre-trained model θ_pt.
        tokenizer: used only for its pad id (may be None: pad id 0); padding is masked anyway.
        doc_encoded: the candidate documents.
        query_encoded: the queries.
        batch_size: examples per forward pass.
    """
    pad_id = pad_id_of(tokenizer) if tokenizer is not None else 0
    docs = mean_pooled_hidden_states(pt_model, doc_encoded, batch_size, pad_id)
    queries = mean_pooled_hidden_states(ft_model, query_encoded, batch_size, pad_id)
    if len(doc_encoded) == 0 or len(query_encoded) == 0:
        return np.zeros((len(doc_encoded), len(query_encoded)), dtype=np.float64)
    if docs.shape[1] != queries.shape[1]:
        raise ValueError(f"hidden sizes differ: pre-trained model {docs.shape[1]}, "
                         f"fine-tuned model {queries.shape[1]}")
    docs = docs / np.maximum(np.linalg.norm(docs, axis=1, keepdims=True), 1e-300)
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-300)
    log.info("RepSim: %d documents x %d queries", len(doc_encoded), len(query_encoded))
    return docs @ queries.T
