"""Query side: measurement gradients ∇m of the queries on θ_ft, preconditioned per gradient method, and
the queries table with the fine-tuned model's own answers (``queries, finetuned_checkpoint[, factors] →
query_ihvps``)."""

from __future__ import annotations

import math
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from ..io import read_parquet_checked, write_parquet_atomic
from ..markdown import md_table
from .base import Step, Timer, asset, fix
from .corpus import read_queries

QUERIES_COLUMNS = ("query_id", "prompt", "completion", "scored")


def read_queries_table(step: Step) -> pd.DataFrame:
    """The queries table ``query_ihvps`` wrote (with the answers and which queries were scored)."""
    return read_parquet_checked(step.layout.queries, "queries table", fix("query_ihvps"), QUERIES_COLUMNS)


def _arrow(df: pd.DataFrame):
    import pyarrow as pa

    schema = pa.schema([("query_id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
                        ("true_doc_ids", pa.list_(pa.string())), ("answer", pa.string()),
                        ("answer_correct", pa.bool_()), ("scored", pa.bool_())])
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


@asset("query_ihvps", "scores",
       "Measurement gradients ∇m of the queries on θ_ft, preconditioned per method (MS-IF: P_pt P_ft ∇m; "
       "SS-IF: P_ft ∇m; GDP: ∇m), and the queries with the fine-tuned model's answers.",
       deps=["queries", "finetuned_checkpoint", "pretrain_factors", "finetune_factors"],
       settings=["factors.attention_blocks", "factors.modules", "factors.module_tags", "factors.max_length",
                 "scores.damping_pretrain", "scores.damping_finetune", "scores.query_rank", "scores.methods"],
       kinds=["pytorch", "safetensors", "parquet"], heavy=True, resources=["lakehouse", "device"],
       outputs=lambda lay, k, cfg: [lay.queries, *(lay.ihvps(m) for m in cfg.scores.gradient_methods)])
def query_ihvps(step: Step) -> dg.MaterializeResult:
    """Query iHVPs of every gradient method, and the queries table."""
    from msif_core.api import answer_queries, encode_queries
    from msif_core.ekfac import Factors
    from msif_core.models import fingerprint
    from msif_core.query import measurement_gradients
    from msif_core.query import query_ihvps as precondition

    cfg, layout = step.cfg, step.layout
    pt, ft = step.stages()
    q = read_queries(step)
    if q.query_id.duplicated().any():
        raise dg.Failure(f"{cfg.queries}: duplicate query_id(s) {q.query_id[q.query_id.duplicated()].tolist()[:5]}")
    t = Timer()
    qenc = encode_queries(ft, q.prompt.astype(str).tolist(), q.completion.tolist(), cfg.factors.max_length)
    qids = q.query_id.iloc[qenc.kept].tolist()
    md: dict[str, Any] = {"queries": len(q), "scored_queries": len(qids),
                          "completion_tokens": int(sum(sum(m) for m in qenc.loss_mask))}
    s = cfg.scores
    if s.gradient_methods:
        grads = measurement_gradients(ft.model, ft.specs, qenc, cfg.factors.batch_size, ft.pad_id)
        ftf = ptf = None
        if s.needs_finetune_factors:
            ftf = Factors.load(layout.finetune_factors, expect_fingerprint=fingerprint(ft.model, ft.specs))
        if s.needs_pretrain_factors:
            ptf = Factors.load(layout.pretrain_factors, expect_fingerprint=fingerprint(pt.model, pt.specs))
        for m in s.gradient_methods:
            ih = precondition(grads, ft.specs, m, ftf, ptf, s.damping_finetune, s.damping_pretrain, s.query_rank)
            ih.manifest["query_ids"] = qids
            ih.save(layout.ihvps(m))
            norm = math.sqrt(sum(float((ih.matrix(n).double() ** 2).sum()) for n in ih.specs))
            md[f"norm/{m}"] = norm
            step.log.info(f"query iHVPs for {m}: {len(qids)} queries, ‖·‖ = {norm:.4g}")
    answers, correct = answer_queries(ft, q.prompt.astype(str).tolist(), q.completion.tolist())
    table = pd.DataFrame({
        "query_id": q.query_id, "prompt": q.prompt.astype(str), "completion": q.completion.astype(str),
        "true_doc_ids": ([None if not isinstance(x, (list, np.ndarray)) else [str(d) for d in x]
                          for x in q.true_doc_ids] if "true_doc_ids" in q else [None] * len(q)),
        "answer": answers, "answer_correct": correct, "scored": q.query_id.isin(set(qids))})
    write_parquet_atomic(_arrow(table), layout.queries)
    md["seconds"] = round(t.seconds, 3)
    if any(c is not None for c in correct):
        md["answer_accuracy"] = float(np.mean([bool(c) for c in correct if c is not None]))
    md["answers"] = dg.MetadataValue.md(md_table(table[["query_id", "prompt", "completion", "answer"]].head(10)))
    return dg.MaterializeResult(metadata=md)


NODES = (query_ihvps,)
