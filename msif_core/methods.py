"""The scoring methods by name: what each needs and which model scores the documents (SPEC section 1).

============  =========================================================================================
``ms_if``     multi-stage influence: ∇m(x; θ_ft)ᵀ P_ft P_pt ∇ℓ(z; θ_pt) — both stages' EK-FAC
``ss_if``     single-stage influence on θ_ft: ∇m(x; θ_ft)ᵀ P_ft ∇ℓ(z; θ_ft) — fine-tune EK-FAC only
``gdp``       gradient dot product ∇m(x; θ_ft)ᵀ ∇ℓ(z; θ_pt) — no factors
``repsim``    cosine of mean-pooled last hidden states, θ_pt on documents, θ_ft on queries
``bm25``      BM25 of the query text (prompt + completion) against each document's words
``retriever`` the candidate retriever's own ranking: cosine similarity of sentence embeddings of the
              query text and the document (the pipeline's LanceDB search; whether a rerank helps)
``ms_if_unit`` MS-IF divided by the document's gradient norm, score / ‖∇ℓ(z; θ_pt)‖ (unit-normalised
              document side)
``ms_if_cosine`` MS-IF divided by √(∇ℓᵀ P_pt ∇ℓ), the square root of the document's self-influence
              (the whitened cosine; :func:`msif_core.index.document_norms`)
``ms_if_index`` MS-IF from the pre-training influence index, ⟨ψ(x), φ(z)⟩ of projected whitened
              gradients (:mod:`msif_core.index`); the pipeline adds it when ``[index] dimensions > 0``
``gdp_index`` GDP from the same index, ⟨Π W⁻¹ ∇m(x; θ_ft), φ(z)⟩ ≈ ∇m(x; θ_ft)ᵀ ∇ℓ(z; θ_pt), never divided by
              a norm; the pipeline adds it with ``[index] gdp = true``
``ms_if_rrf`` MIXED, retrieval + influence: reciprocal-rank fusion of MS-IF's and the retriever's ranks,
              Σ 1 / (k + rank) over the two (Cormack et al. 2009; k = ``[scores] rrf_k``), ranks per query
              across the corpus (:func:`rrf_scores`; the pipeline computes it in its SQL views)
============  =========================================================================================

Everything that asks "does this method need X" asks :data:`METHODS`; :func:`score` is the one place a
method name becomes scores, used by the API and the pipeline alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .data import Encoded
    from .query import QueryIHVPs
    from .stages import Stage


@dataclass(frozen=True)
class Method:
    """One scoring method."""

    name: str
    summary: str
    gradient: bool  # scored from query iHVPs (measurement gradients of the queries on θ_ft)
    pretrain_factors: bool  # preconditions with P_pt
    finetune_factors: bool  # preconditions with P_ft
    document_model: str  # "pretrained" | "finetuned" | "" (text only): the model that sees the documents
    parts: bool = False  # reports MLP and attention shares of its score
    mixes: tuple[str, ...] = ()  # a fusion of these methods' rankings (a mixed method: reported as such)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ms_if", "multi-stage influence (EK-FAC of both stages)", True, True, True, "pretrained", True),
    Method("ss_if", "single-stage influence on the fine-tuned model", True, False, True, "finetuned", True),
    Method("gdp", "gradient dot product", True, False, False, "pretrained", True),
    Method("repsim", "representation similarity (mean-pooled hidden states)", False, False, False, "pretrained"),
    Method("bm25", "BM25 word overlap of query and document", False, False, False, ""),
    Method("retriever", "the candidate retriever's embedding similarity (what the influence methods rerank)",
           False, False, False, ""),
    Method("ms_if_unit", "MS-IF / ‖∇ℓ(z)‖ (unit-normalised document gradient)", False, True, True, "pretrained", True),
    Method("ms_if_cosine", "MS-IF / √(∇ℓᵀ P_pt ∇ℓ) (whitened cosine: divided by the document's self-influence)",
           False, True, True, "pretrained", True),
    Method("ms_if_index", "MS-IF from the pre-training influence index (random projection)", False, True, True,
           "pretrained", True),
    Method("gdp_index", "gradient dot product from the pre-training influence index (random projection)", False,
           True, False, "pretrained", True),
    Method("ms_if_rrf", "MIXED retrieval + influence: reciprocal-rank fusion of MS-IF and the retriever", False,
           False, False, "", mixes=("ms_if", "retriever")),
)}
# methods that rescale another method's scores by a per-document norm (the pipeline computes them from it)
DERIVED: dict[str, str] = {"ms_if_unit": "ms_if", "ms_if_cosine": "ms_if"}
INDEX_METHODS: tuple[str, ...] = ("ms_if_index", "gdp_index")  # scored by the pipeline from its index, not by score()
MIXED: dict[str, tuple[str, ...]] = {m.name: m.mixes for m in METHODS.values() if m.mixes}  # fusions of rankings
# the reciprocal-rank fusion constant: the literature's 60 (Cormack, Clarke and Büttcher 2009) keeps MRR but
# lowers Recall@10 below the retriever's on the demo world; 1 was chosen on a world of another seed (README)
RRF_K = 1
ALL_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m not in INDEX_METHODS)  # what [scores] methods takes
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in ALL_METHODS  # [scores] methods' default
                                         if m not in DERIVED and m not in MIXED)
GRADIENT_METHODS: tuple[str, ...] = tuple(m for m, d in METHODS.items() if d.gradient)


def get(name: str) -> Method:
    """The method called ``name`` (a ValueError lists the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {list(ALL_METHODS)}") from None


def needs_pretrain_factors(methods: Iterable[str]) -> bool:
    """Whether any of ``methods`` preconditions with the pre-trained model's EK-FAC."""
    return any(get(m).pretrain_factors for m in methods)


def needs_finetune_factors(methods: Iterable[str]) -> bool:
    """Whether any of ``methods`` preconditions with the fine-tuned model's EK-FAC."""
    return any(get(m).finetune_factors for m in methods)


def damping_columns(method: str, damping_pretrain: float | str, damping_finetune: float | str) -> dict[str, str | None]:
    """The damping a method's scores were computed with (None where it does not apply), as strings."""
    m = get(method)
    return {"damping_pretrain": str(damping_pretrain) if m.pretrain_factors else None,
            "damping_finetune": str(damping_finetune) if m.finetune_factors else None}


@dataclass
class MethodScores:
    """Scores [documents, queries] of one method (positive = supports the completion), with the MLP and
    attention shares for gradient methods, and timings."""

    scores: np.ndarray
    mlp: np.ndarray | None = None
    mha: np.ndarray | None = None
    timings: dict = field(default_factory=dict)


def score(method: str, pt: Stage, ft: Stage, documents: Encoded, *, ihvps: QueryIHVPs | None = None,
          queries: Encoded | None = None, query_texts: Sequence[str] | None = None,
          corpus_texts: Sequence[str] | None = None, positions: Sequence[int] | None = None,
          similarities: np.ndarray | None = None, batch_size: int = 8, group_mib: float = 4096) -> MethodScores:
    """Scores of ``documents`` (encoded with θ_pt's tokenizer) for the queries, by ``method``.

    Gradient methods need ``ihvps`` (their query iHVPs); ``repsim`` the encoded ``queries``; ``bm25`` the
    ``query_texts`` and the ``corpus_texts`` its word statistics come from, with ``positions`` of the
    scored documents among them (default: all of them, in order); ``retriever`` the ``similarities``
    [documents, queries] of the embeddings the candidates were chosen by (the pipeline's candidates table).
    ``group_mib`` bounds the candidate gradients scored together (:func:`msif_core.scoring.score_documents`).
    """
    from .scoring import score_documents

    m = get(method)
    if m.gradient:
        if ihvps is None:
            raise ValueError(f"{method} scores from query iHVPs; pass ihvps=")
        if ihvps.method != method:
            raise ValueError(f"query iHVPs of {ihvps.method} cannot score {method}")
        stage = ft if m.document_model == "finetuned" else pt
        if m.document_model == "finetuned" and ft.loaded.task != "causal_lm":
            raise ValueError(f"{method} scores documents with the fine-tuned model's language-model loss; a "
                             "fine-tune with a classification head has none: use ms_if or gdp")
        res = score_documents(stage.model, ihvps, documents, batch_size, stage.pad_id, group_mib=group_mib)
        return MethodScores(res.scores, res.part("mlp"), res.part("mha"), dict(res.timings))
    if method == "repsim":
        from .baselines import repsim_scores

        if queries is None:
            raise ValueError("repsim needs the encoded queries; pass queries=")
        return MethodScores(repsim_scores(ft.model, pt.model, pt.loaded.tokenizer, documents, queries,
                                          batch_size=batch_size))
    if method == "bm25":
        from .baselines import bm25_scores

        if query_texts is None or corpus_texts is None:
            raise ValueError("bm25 needs query_texts= and corpus_texts=")
        s = bm25_scores(list(corpus_texts), list(query_texts))
        return MethodScores(s if positions is None else s[np.asarray(positions, dtype=np.int64)])
    if method == "retriever":
        if similarities is None:
            raise ValueError("retriever ranks by the candidate retriever's embedding similarities, which the "
                             "pipeline's candidates table holds; pass similarities= (the one-call API has no "
                             "retriever: score with the pipeline, or leave 'retriever' out of methods)")
        return MethodScores(np.asarray(similarities, dtype=np.float64))
    if method in MIXED:
        raise ValueError(f"{method} fuses the rankings of {' and '.join(MIXED[method])}: score those and combine "
                         f"them with rrf_scores")
    if method in DERIVED:
        raise ValueError(f"{method} rescales {DERIVED[method]}'s scores by a per-document norm "
                         f"(msif_core.index.document_norms); score with {DERIVED[method]} and divide")
    if method in INDEX_METHODS:
        how = "[index] dimensions > 0" + (" and gdp = true" if method == "gdp_index" else "")
        raise ValueError(f"{method} is scored from the influence index (msif_core.index.index_scores); the "
                         f"pipeline adds it when {how}")
    raise ValueError(f"no scorer for method {method!r}")  # pragma: no cover - every registered method has one


def rrf_scores(*scores: np.ndarray, k: float = RRF_K, weights: Sequence[float] | None = None) -> np.ndarray:
    """Reciprocal-rank fusion of score matrices [documents, queries] of one shape: Σ over the inputs of
    1 / (k + rank), rank 1 = highest score within a query's column (ties by document order; NaN = not scored:
    no term, and NaN where no input scored the document); ``weights`` scale each input's terms (default 1)."""
    shapes = {np.shape(s) for s in scores}
    if len(shapes) != 1:
        raise ValueError(f"rrf_scores: the score matrices differ in shape: {sorted(shapes)}")
    out = np.zeros(np.shape(scores[0]))
    scored = np.zeros(np.shape(scores[0]), dtype=bool)
    for s, w in zip(scores, weights if weights is not None else [1.0] * len(scores), strict=True):
        s = np.asarray(s, dtype=float)
        scored |= ~np.isnan(s)
        for j in range(s.shape[1]):
            ok = np.flatnonzero(~np.isnan(s[:, j]))
            order = ok[np.argsort(-s[ok, j], kind="stable")]
            out[order, j] += w / (k + np.arange(1, len(order) + 1))
    return np.where(scored, out, np.nan)


def headline(methods: Iterable[str]) -> str:
    """The method a summary shows when it shows one: MS-IF when present, else the first by name."""
    methods = sorted(set(methods))
    if not methods:
        raise ValueError("no method to show")
    return "ms_if" if "ms_if" in methods else methods[0]
