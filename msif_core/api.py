"""The public, one-call API: from two checkpoints and three data sets to a table of influence scores.

Example::

    from msif_core import attribute, AttributionSettings
    table = attribute("ckpt/pretrained", "ckpt/finetuned",
                      documents=[("d1", "Zorbin Kel was born in Velmora."), ...],
                      finetuning=[("Question: Where was Ada born?\\nAnswer:", " Paris"), ...],
                      queries=[("q1", "Question: Where was Zorbin Kel born?\\nAnswer:", " Velmora")])
    table[table.method == "ms_if"].sort_values("rank").head()

Each step is also a function of its own module (``stages``, ``data``, ``ekfac``, ``query``, ``scoring``,
``methods``, ``tables``), which is how the Dagster pipeline calls them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import methods as registry
from .data import Encoded, encode_documents
from .ekfac import CACHE_AUTO_SHARE, Factors, FitSettings, fit_ekfac
from .memory import peak_rss_bytes, retain_freed_memory
from .methods import GRADIENT_METHODS, MethodScores
from .plan import model_bytes, plan_memory, vocab_size
from .query import chunk_ihvps, query_ihvps
from .settings import FactorSettings, ScoreSettings, setting
from .stages import Stage, answer_queries, encode_queries, load_stages
from .tables import long_table, with_rank

log = logging.getLogger(__name__)

__all__ = ["AttributionSettings", "Stage", "answer_queries", "attribute", "encode_queries", "fit_stage_factors",
           "load_stages", "score_method", "scores_table"]


@dataclass(frozen=True)
class AttributionSettings(ScoreSettings, FactorSettings):
    """Settings of one attribution run: the fields of :class:`~msif_core.settings.FactorSettings` and
    :class:`~msif_core.settings.ScoreSettings` (an experiment file's ``[factors]`` and ``[scores]``), with
    the gradient methods as default, ``module_tags`` as a dict, and the true-Fisher seed."""

    methods: tuple[str, ...] = setting(GRADIENT_METHODS, "methods to score with (see msif_core.methods)")
    module_tags: dict[str, str] | None = setting(
        None, "for architectures msif does not know: {module name: 'mlp' | 'mha'}, each module one block; "
              "replaces the automatic discovery")
    seed: int = setting(0, "seed of the true-Fisher sampling")

    def fit_settings(self) -> FitSettings:
        """The EK-FAC part of these settings; with a memory budget, the fit's pass cache takes at most
        :data:`~msif_core.ekfac.CACHE_AUTO_SHARE` of it (without one, of the memory available)."""
        cache = None if self.memory_gib is None else CACHE_AUTO_SHARE * self.memory_gib * 1024
        return FitSettings(fisher=self.fisher, max_examples=self.max_examples, batch_size=self.batch_size,
                           seed=self.seed, cache_mib=cache)


def fit_stage_factors(stage: Stage, encoded: Encoded, settings: AttributionSettings) -> Factors:
    """EK-FAC factors of one stage's model on its own data."""
    return fit_ekfac(stage.model, stage.specs, encoded, settings.fit_settings(), stage.pad_id)


def score_method(method: str, pt: Stage, ft: Stage, query_grads: Mapping[str, torch.Tensor], docs: Encoded,
                 settings: AttributionSettings, pt_factors: Factors | None, ft_factors: Factors | None) -> MethodScores:
    """Query iHVPs for gradient ``method`` and the scores of every document in ``docs``."""
    ih = query_ihvps(query_grads, ft.specs, method, ft_factors, pt_factors, settings.damping_finetune,
                     settings.damping_pretrain, settings.query_rank)
    return registry.score(method, pt, ft, docs, ihvps=ih, batch_size=settings.batch_size)


def scores_table(result: MethodScores, method: str, doc_ids: Sequence[str], query_ids: Sequence[str],
                 damping: dict | None = None) -> pd.DataFrame:
    """Long table: query_id, doc_id, method, score, mlp_score, mha_score, rank (1 = most supporting), in the
    order of the score matrix (query-major)."""
    df = with_rank(long_table(result.scores, doc_ids, query_ids, method, result.mlp, result.mha)).sort_index()
    for k, v in (damping or {}).items():
        df[k] = v
    return df


def gradient_tables(pt: Stage, ft: Stage, qenc: Encoded, query_ids: Sequence[str], docs: Encoded,
                    doc_ids: Sequence[str], settings: AttributionSettings, pt_factors: Factors | None,
                    ft_factors: Factors | None, stats: dict | None = None) -> dict[str, pd.DataFrame]:
    """Long tables of every gradient method, query chunk by query chunk within the memory plan
    (:mod:`msif_core.plan`): each chunk's iHVPs exist only while it is scored (its measurement gradients
    only while a slice of it is preconditioned), one pass over ``docs`` per chunk and method, in document
    batches of the plan's size. The plan counts both models and the factors as held (lazily read factors,
    ``Factors.load(lazy=True)``, count a module at a time). ``stats`` receives the plan, the passes, the
    seconds of the query side and of scoring, and the process's peak resident bytes after the query side of
    every chunk (``query_peak_rss``) and at the end (``peak_rss``; :func:`msif_core.memory.peak_rss_bytes`)."""
    methods = settings.gradient_methods
    if not methods:
        return {}
    dev = next(ft.model.parameters()).device
    resident = model_bytes(pt.model, ft.model) + sum(f.resident_bytes() for f in (pt_factors, ft_factors) if f)
    plan = plan_memory(ft.specs, len(qenc), settings.query_rank, max(len(x) for x in qenc.input_ids),
                       next(ft.model.parameters()).dtype, settings.memory_gib, dev,
                       max(len(x) for x in docs.input_ids), resident_bytes=resident,
                       batch_size=settings.batch_size, vocab=vocab_size(pt.model))
    log.info(plan.describe())
    parts: dict[str, list[MethodScores]] = {m: [] for m in methods}
    query_s = score_s = 0.0
    query_peak = 0
    for i, chunk in enumerate(plan.ranges()):
        t0 = time.perf_counter()
        ihvps = chunk_ihvps(ft.model, ft.specs, qenc.subset(chunk), methods, ft_factors, pt_factors,
                            settings.damping_finetune, settings.damping_pretrain, settings.query_rank,
                            settings.batch_size, ft.pad_id)
        t1 = time.perf_counter()
        query_s += t1 - t0
        query_peak = max(query_peak, peak_rss_bytes())
        for method in methods:
            parts[method].append(registry.score(method, pt, ft, docs, ihvps=ihvps.pop(method),
                                                batch_size=plan.batch_size, group_mib=plan.group_mib))
        score_s += time.perf_counter() - t1
        if plan.chunks > 1:
            log.info("query chunk %d/%d done", i + 1, plan.chunks)
    if stats is not None:
        stats.update(plan=plan.as_dict(), passes=plan.chunks * len(methods), query_s=query_s, score_s=score_s,
                     query_peak_rss=query_peak, peak_rss=peak_rss_bytes())
    out = {}
    for method, res in parts.items():
        joined = MethodScores(*(np.concatenate([getattr(r, f) for r in res], axis=1) for f in ("scores", "mlp", "mha")),
                              timings={"chunks": plan.chunks, "plan": plan.as_dict()})
        out[method] = scores_table(joined, method, doc_ids, query_ids)
    return out


def attribute(pretrained: str | Path, finetuned: str | Path, documents: Sequence[tuple[str, str]],
              finetuning: Sequence[tuple[str, str]], queries: Sequence[tuple[str, str, str]],
              settings: AttributionSettings | None = None, device: str = "cpu") -> pd.DataFrame:
    """Score every document against every query with each method in ``settings.methods``.

    Args:
        pretrained, finetuned: local checkpoint directories.
        documents: (doc_id, text) pairs of the pre-training corpus (or the candidates to score).
        finetuning: (prompt, completion) pairs the fine-tuned model was trained on.
        queries: (query_id, prompt, completion) triples answered by the fine-tuned model.
    Returns:
        A long DataFrame; positive scores mean the document supports the completion, rank 1 first.
    """
    settings = settings or AttributionSettings()
    for m in settings.methods:
        registry.get(m)
    if "retriever" in settings.methods:
        raise ValueError("methods: 'retriever' is the pipeline's candidate retriever (LanceDB embedding search); "
                         "attribute() scores every document without one. Fix: leave it out of methods, or run the "
                         "pipeline (msif run), whose tables carry it")
    pipeline_only = [m for m in settings.methods
                     if m in registry.MIXED or m in registry.DERIVED or m in registry.INDEX_METHODS]
    if pipeline_only:  # refused before any model is loaded
        raise ValueError(f"methods: {pipeline_only} are computed by the pipeline from other methods' rows or from "
                         "the influence index (mixed rankings, normalised scores, ms_if_index, gdp_index); "
                         "attribute() scores the plain methods only. Fix: leave them out of methods, or run the "
                         "pipeline (msif run)")
    need_ft = settings.needs_finetune_factors
    for what, given, fix in (("documents", documents, "pass the pre-training documents as (doc_id, text) pairs"),
                             ("queries", queries, "pass (query_id, prompt, completion) triples"),
                             ("finetuning", finetuning if need_ft else [None],
                              "pass the (prompt, completion) pairs the model was fine-tuned on (ms_if and "
                              "ss_if fit its EK-FAC on them), or use methods=('gdp',)")):
        if len(given) == 0:
            raise ValueError(f"{what} is empty. Fix: {fix}")
    retain_freed_memory()
    t0 = time.perf_counter()
    pt, ft = load_stages(pretrained, finetuned, settings, device=device)
    docs = encode_documents(pt.loaded.tokenizer, [t for _, t in documents], settings.max_length)
    if len(docs) == 0:
        raise ValueError(f"documents: none of the {len(documents)} has the 2 tokens scoring needs. Fix: pass "
                         f"longer texts")
    doc_ids = [documents[i][0] for i in docs.kept]
    qenc = encode_queries(ft, [p for _, p, _ in queries], [c for _, _, c in queries], settings.max_length)
    if len(qenc) == 0:
        raise ValueError(f"queries: none of the {len(queries)} has a completion token within max_length="
                         f"{settings.max_length}. Fix: give each query a non-empty completion")
    query_ids = [queries[i][0] for i in qenc.kept]
    ft_factors = pt_factors = None
    if need_ft:
        fenc = encode_queries(ft, [p for p, _ in finetuning], [c for _, c in finetuning], settings.max_length)
        if len(fenc) == 0:
            raise ValueError(f"finetuning: none of the {len(finetuning)} pairs has a completion token within "
                             f"max_length={settings.max_length}. Fix: give each pair a non-empty completion")
        ft_factors = fit_stage_factors(ft, fenc, settings)
    if settings.needs_pretrain_factors:
        pt_factors = fit_stage_factors(pt, docs, settings)
    tables = gradient_tables(pt, ft, qenc, query_ids, docs, doc_ids, settings, pt_factors, ft_factors)
    for method in settings.methods:
        if not registry.get(method).gradient:
            kept = [queries[i] for i in qenc.kept]
            res = registry.score(method, pt, ft, docs, queries=qenc, query_texts=[p + str(c) for _, p, c in kept],
                                 corpus_texts=[documents[i][1] for i in docs.kept], batch_size=settings.batch_size)
            tables[method] = scores_table(res, method, doc_ids, query_ids)
    tables = [tables[m] for m in settings.methods]
    log.info("attributed %d queries over %d documents in %.1fs", len(query_ids), len(doc_ids),
             time.perf_counter() - t0)
    return pd.concat(tables, ignore_index=True)
