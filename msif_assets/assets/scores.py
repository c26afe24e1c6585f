"""Scores: every candidate pair of one shard scored by every configured method (``candidates[s],
corpus_shards[s], query_ihvps, checkpoints → influence_scores[s]``). The method logic is
:func:`msif_core.methods.score`; the rows and their rank are :mod:`msif_core.tables`'s."""

from __future__ import annotations

from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from msif_core import methods as registry
from msif_core.tables import long_table, with_rank

from ..io import CorruptTableError, read_parquet_checked, write_parquet_atomic
from ..markdown import md_table
from ..sources import CORPUS_PARTITIONS
from .base import Step, Timer, asset, fix, memory_plan
from .corpus import read_documents
from .queries import chunk_dirs, read_queries_table


def _scores_schema():
    import pyarrow as pa

    return pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("method", pa.string()),
                      ("score", pa.float64()), ("mlp_score", pa.float64()), ("mha_score", pa.float64()),
                      ("self_influence", pa.float64()), ("shard_rank", pa.int64()), ("shard", pa.string()),
                      ("candidate_distance", pa.float64()),
                      ("damping_pretrain", pa.string()), ("damping_finetune", pa.string()),
                      ("pretrained_version", pa.string()), ("finetuned_version", pa.string())])


SCORES_SCHEMA = _scores_schema()  # columns of every influence_scores partition
# self_influence: the document's ∇ℓ(z)ᵀ P_pt ∇ℓ(z) on θ_pt at damping_pretrain, on the rows of the normalised
# methods (ms_if_unit, ms_if_cosine: the pass that divides by it computes it); NULL on every other row


def score_shard(step: Step, docs: pd.DataFrame, cands: pd.DataFrame, qtab: pd.DataFrame,
                key: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score one shard's candidate pairs with every configured method; the long table and metadata."""
    from msif_core.api import encode_queries
    from msif_core.data import encode_documents
    from msif_core.query import QueryIHVPs

    cfg, layout = step.cfg, step.layout
    pt, ft = step.stages()
    scored_q = qtab[qtab.scored].reset_index(drop=True)
    cands = cands[cands.query_id.isin(set(scored_q.query_id))]
    need = docs[docs.doc_id.isin(set(cands.doc_id))].reset_index(drop=True)
    enc = encode_documents(pt.loaded.tokenizer, need.text.tolist(), cfg.factors.max_length)
    kept = need.iloc[enc.kept].reset_index(drop=True)
    md: dict[str, Any] = {"candidate_documents": len(need), "scored_documents": len(kept),
                          "dropped_documents": len(need) - len(kept), "queries": len(scored_q),
                          "document_tokens": enc.n_tokens, "truncated_documents": enc.n_truncated}
    frames = []
    dev = next(pt.model.parameters()).device
    position = {d: i for i, d in enumerate(kept.doc_id)}
    plan = memory_plan(step, pt, ft, len(scored_q), 8)  # its document batch and candidate group
    for m in cfg.scores.methods:
        if m in registry.DERIVED or m in registry.MIXED:  # from their base methods' rows: below, or in the SQL views
            continue
        t = Timer()
        if registry.get(m).gradient:  # query chunk by chunk: each chunk's candidates only
            dirs = chunk_dirs(layout, m)
            seen: list[str] = []
            for d in dirs:
                ih = QueryIHVPs.load(d, device=dev)
                cq = list(ih.manifest["query_ids"])
                seen += cq
                cc = cands[cands.query_id.isin(set(cq))]
                pos = sorted({position[x] for x in cc.doc_id if x in position})
                if not pos:
                    continue
                try:
                    res = registry.score(m, pt, ft, enc.subset(pos), ihvps=ih, batch_size=plan.batch_size,
                                         group_mib=plan.group_mib)
                except ValueError as e:
                    raise dg.Failure(str(e)) from e
                long = long_table(res.scores, kept.doc_id.iloc[pos].tolist(), cq, m, res.mlp, res.mha)
                frames.append(long.merge(cc[["query_id", "doc_id", "distance"]], on=["query_id", "doc_id"],
                                         how="inner"))
                md[f"candidate_pairs/{m}"] = md.get(f"candidate_pairs/{m}", 0) + len(frames[-1])
                del ih, res
            if not dirs or sorted(seen) != sorted(scored_q.query_id):
                raise CorruptTableError(f"query iHVPs of {m} in {layout.ihvps(m)} hold other queries than "
                                        f"{layout.queries}. Fix: {fix('query_ihvps')}")
            md[f"passes/{m}"] = len(dirs)
            md[f"docs_per_second/{m}"] = round(md.get(f"candidate_pairs/{m}", 0) / max(len(scored_q), 1)
                                               / max(t.seconds, 1e-9), 2)
        else:
            kw: dict[str, Any] = {}
            qids = scored_q.query_id.tolist()
            if m == "retriever":  # the candidates' own cosine similarity, 1 - distance
                sim = (cands.assign(s=1.0 - cands.distance.astype(float))
                       .pivot_table(index="doc_id", columns="query_id", values="s", aggfunc="first"))
                kw["similarities"] = sim.reindex(index=kept.doc_id, columns=qids).to_numpy(dtype=float)
            elif m == "repsim":
                qenc = encode_queries(ft, scored_q.prompt.tolist(), scored_q.completion.tolist(),
                                      cfg.factors.max_length)
                qids = scored_q.query_id.iloc[qenc.kept].tolist()
                kw["queries"] = qenc
            else:
                kw.update(query_texts=(scored_q.prompt + scored_q.completion).tolist(),
                          corpus_texts=docs.text.tolist(), positions=pd.Index(docs.doc_id).get_indexer(kept.doc_id))
            res = registry.score(m, pt, ft, enc, batch_size=cfg.factors.batch_size, **kw)
            long = long_table(res.scores, kept.doc_id.tolist(), qids, m, res.mlp, res.mha)
            frames.append(long.merge(cands[["query_id", "doc_id", "distance"]], on=["query_id", "doc_id"],
                                     how="inner"))
        md[f"seconds/{m}"] = round(t.seconds, 3)
    derived = [m for m in cfg.scores.methods if m in registry.DERIVED]
    if derived and frames:  # the base method's rows divided by each document's norm (one more pass)
        frames += derived_rows(step, pt, enc, kept, pd.concat(frames, ignore_index=True), derived, md)
    if cfg.index.enabled:  # every document of the shard by ⟨ψ, φ⟩, each query's top [index] keep
        from .index import index_rows

        t = Timer()
        rows = index_rows(step, key, pt.specs)
        rows = rows[rows.query_id.isin(set(scored_q.query_id))]
        frames.append(rows.merge(cands[["query_id", "doc_id", "distance"]], on=["query_id", "doc_id"], how="left"))
        for m in cfg.index.methods:
            md[f"index_pairs/{m}"] = int((rows.method == m).sum())
        md["seconds/index"] = round(t.seconds, 3)
    if not frames:  # no candidate pair in this shard: an empty table of the same columns
        frames = [long_table(np.zeros((0, 0)), [], [], "", None, None).assign(distance=np.nan)]
    table = pd.concat(frames, ignore_index=True).rename(columns={"distance": "candidate_distance"})
    table = with_rank(table, "shard_rank")
    table["shard"] = key
    if "self_influence" not in table:  # no normalised method: NULL
        table["self_influence"] = np.nan
    damping = {m: registry.damping_columns(m, cfg.scores.damping_pretrain, cfg.scores.damping_finetune)
               for m in (*cfg.scores.methods, *cfg.index.methods)
               if m not in registry.MIXED}
    if "gdp_index" in damping and not cfg.index.whiten:  # a plain index: λ_pt enters neither side of GDP's
        damping["gdp_index"] = {"damping_pretrain": None, "damping_finetune": None}
    for col in ("damping_pretrain", "damping_finetune"):
        applies = [m for m, d in damping.items() if d[col] is not None]
        value = damping[applies[0]][col] if applies else None
        table[col] = np.where(table.method.isin(applies), value, None)
    table["pretrained_version"], table["finetuned_version"] = step.model_versions()
    return table[SCORES_SCHEMA.names].reset_index(drop=True), md


def derived_rows(step: Step, pt, enc, kept: pd.DataFrame, rows: pd.DataFrame, methods: list[str],
                 md: dict[str, Any]) -> list[pd.DataFrame]:
    """Rows of the normalised methods (``ms_if_unit``, ``ms_if_cosine``): their base method's rows with the
    score and its parts divided by each document's gradient norm or √self-influence on θ_pt
    (:func:`msif_core.index.document_norms`, one pass over the documents those rows name), the self-influence
    itself in column ``self_influence``."""
    import torch

    from msif_core.ekfac import Factors
    from msif_core.index import document_norms
    from msif_core.models import fingerprint

    t = Timer()
    base = rows[rows.method.isin({registry.DERIVED[m] for m in methods})]
    pos = sorted(pd.Index(kept.doc_id).get_indexer(base.doc_id.unique()).tolist())
    dtype = next(pt.model.parameters()).dtype
    cast = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    ptf = Factors.load(step.layout.pretrain_factors, expect_fingerprint=fingerprint(pt.model, pt.specs), dtype=cast,
                       lazy=False)  # every batch visits every module
    norms = document_norms(pt.model, pt.specs, enc.subset(pos), ptf, step.cfg.scores.damping_pretrain,
                           step.cfg.factors.batch_size, pt.pad_id)
    ids = kept.doc_id.iloc[pos].tolist()
    by = {"ms_if_unit": pd.Series(np.sqrt(norms.grad_sq), index=ids),
          "ms_if_cosine": pd.Series(np.sqrt(norms.self_influence), index=ids)}
    self_influence = pd.Series(norms.self_influence, index=ids)
    out = []
    for m in methods:
        r = base[base.method == registry.DERIVED[m]].copy()
        div = by[m].reindex(r.doc_id).to_numpy()
        div = np.where(div > 0, div, np.nan)  # a document without gradient has no direction
        for col in ("score", "mlp_score", "mha_score"):
            r[col] = r[col].to_numpy(dtype=float) / div
        r["self_influence"] = self_influence.reindex(r.doc_id).to_numpy(dtype=float)
        r["method"] = m
        out.append(r)
        md[f"candidate_pairs/{m}"] = len(r)
    md["seconds/document_norms"] = round(t.seconds, 3)
    return out


def stored_methods_version(cfg) -> str:
    """The methods whose rows influence_scores stores (a mixed method is computed by the SQL views: adding one
    rescores nothing) and the table's columns (a table written with other columns is rewritten)."""
    return ("methods=" + ",".join(m for m in cfg.scores.methods if m not in registry.MIXED)
            + "; columns=" + ",".join(SCORES_SCHEMA.names))


@asset("influence_scores", "scores",
       lambda cfg, _: f"Scores of every candidate document of this shard for every query, methods "
       f"{list(cfg.scores.methods)} (positive = supports the completion; shard_rank 1 = most supporting in the "
       "shard)" + (f"; {' and '.join(cfg.index.methods)}: each query's top {cfg.index.keep} by the influence index"
                   if cfg.index.enabled else "") + ".",
       deps=["candidates", "corpus_shards", "query_ihvps", "pretrained_checkpoint", "finetuned_checkpoint",
             "influence_index", "query_vectors"],
       settings=["factors.max_length", "scores.damping_pretrain", "scores.damping_finetune"],
       version_extra=lambda cfg, _: stored_methods_version(cfg) + (f"; index keep={cfg.index.keep}"
                                                                   + ("; cosine" if cfg.index.cosine else "")
                                                                   + ("; gdp" if cfg.index.gdp else "")
                                                                   if cfg.index.enabled else ""),
       partitions=CORPUS_PARTITIONS, kinds=["pytorch", "parquet"], heavy=True, resources=["lakehouse", "device"],
       outputs=lambda lay, k, _: [lay.scores(k)])
def influence_scores(step: Step) -> dg.MaterializeResult:
    """One shard's score table."""
    key, layout = step.key, step.layout
    docs = read_documents(step, key)
    cands = read_parquet_checked(layout.candidates(key), f"candidates of {key}", fix("candidates", key),
                                 ("query_id", "doc_id", "distance"))
    qtab = read_queries_table(step)
    t = Timer()
    table, md = score_shard(step, docs, cands, qtab, key)
    bad = int((~np.isfinite(table.score.to_numpy(dtype=float))).sum())
    if bad:
        step.log.warning(f"{key}: {bad} non-finite scores (see the scores_finite check)")
    path = write_parquet_atomic(table, layout.scores(key), schema=SCORES_SCHEMA)
    md.update({"rows": len(table), "dagster/row_count": len(table), "seconds": round(t.seconds, 3),
               "path": dg.MetadataValue.path(str(path)), "non_finite_scores": bad})
    first = table[(table.query_id == table.query_id.iloc[0]) & (table.shard_rank <= 5)] if len(table) else table
    md["top_in_shard_for_first_query"] = dg.MetadataValue.md(
        md_table(first[["method", "shard_rank", "doc_id", "score"]].sort_values(["method", "shard_rank"])))
    return dg.MaterializeResult(metadata=md)


NODES = (influence_scores,)
