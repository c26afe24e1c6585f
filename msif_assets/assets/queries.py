"""Query side: measurement gradients ∇m of the queries on θ_ft, preconditioned per gradient method, and
the queries table with the fine-tuned model's own answers (``queries, finetuned_checkpoint[, factors] →
query_ihvps``)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from ..io import read_parquet_checked, write_parquet_atomic
from ..markdown import md_table
from .base import Step, Timer, asset, fix, memory_plan
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


def chunk_dirs(layout, method: str) -> list[Path]:
    """The chunk folders of one method's query iHVPs, in order (an older single folder counts as one)."""
    root = layout.ihvps(method)
    if (root / "manifest.json").exists():
        return [root]
    return sorted(d for d in root.glob("chunk_*") if d.is_dir())


def _chunk_done(d: Path, key: str) -> bool:
    """Whether chunk folder ``d`` holds iHVPs computed for ``key`` and still as written."""
    from ..outputs import file_fingerprint

    try:
        done = json.loads((d / ".done").read_text())
        return done.get("key") == key and done.get("file") == file_fingerprint(d / "ihvps.safetensors")
    except (OSError, ValueError):
        return False


def write_chunks(step: Step, pt, ft, qenc, qids: list[str]) -> dict[str, Any]:
    """Every gradient method's query iHVPs, query chunk by chunk within the memory plan, each chunk in its
    own folder (``ihvps/<method>/chunk_00000``) marked done when written; a rerun after a failure keeps the
    chunks already done for the same inputs and computes the rest."""
    import torch

    from msif_core.ekfac import Factors
    from msif_core.models import fingerprint
    from msif_core.query import chunk_ihvps

    from ..outputs import file_fingerprint

    cfg, layout, s = step.cfg, step.layout, step.cfg.scores
    if not qids:
        raise dg.Failure(f"{cfg.queries}: no query has a completion token within max_length="
                         f"{cfg.factors.max_length}; give the queries non-empty completions")
    ftf = ptf = None
    inputs = {"methods": list(s.gradient_methods), "damping": [str(s.damping_finetune), str(s.damping_pretrain)],
              "rank": s.query_rank, "ft": fingerprint(ft.model, ft.specs), "max_length": cfg.factors.max_length}
    dtype = next(ft.model.parameters()).dtype
    cast = dtype if dtype in (torch.float32, torch.float64) else torch.float32  # preconditioning's own precision
    if s.needs_finetune_factors:
        ftf = Factors.load(layout.finetune_factors, expect_fingerprint=inputs["ft"], dtype=cast,
                           lazy=True)
        inputs["ft_factors"] = file_fingerprint(layout.finetune_factors / "factors.safetensors")
    if s.needs_pretrain_factors:
        ptf = Factors.load(layout.pretrain_factors, expect_fingerprint=fingerprint(pt.model, pt.specs),
                           dtype=cast, lazy=True)
        inputs["pt_factors"] = file_fingerprint(layout.pretrain_factors / "factors.safetensors")
    plan = memory_plan(step, pt, ft, len(qids), max(len(x) for x in qenc.input_ids))
    step.log.info(plan.describe())
    sq = dict.fromkeys(s.gradient_methods, 0.0)
    resumed = []
    for i, chunk in enumerate(plan.ranges()):
        cq = [qids[j] for j in chunk]
        tokens = [[qenc.input_ids[j], [int(b) for b in qenc.loss_mask[j]]] for j in chunk]  # text, tokenizer, length
        labels = [int(qenc.labels[j]) for j in chunk] if qenc.labels is not None else None
        key = hashlib.sha256(json.dumps(inputs | {"queries": cq, "tokens": tokens, "labels": labels,
                                                  "rank_scope": "module",
                                                  "modules": [sp.name for sp in ft.specs]},
                                        sort_keys=True).encode()).hexdigest()
        dirs = {m: layout.ihvps(m) / f"chunk_{i:05d}" for m in s.gradient_methods}
        if all(_chunk_done(d, key) for d in dirs.values()):
            resumed.append(i)
            for m, d in dirs.items():
                sq[m] += float(json.loads((d / "manifest.json").read_text()).get("sq_norm", 0.0))
            continue
        for m, ih in chunk_ihvps(ft.model, ft.specs, qenc.subset(chunk), s.gradient_methods, ftf, ptf,
                                 s.damping_finetune, s.damping_pretrain, s.query_rank, cfg.factors.batch_size,
                                 ft.pad_id).items():
            norm = ih.sq_norm()
            sq[m] += norm
            (dirs[m] / ".done").unlink(missing_ok=True)
            ih.manifest.update(query_ids=cq, chunk=i, chunks=plan.chunks, sq_norm=norm)
            ih.save(dirs[m])
            (dirs[m] / ".done").write_text(json.dumps({"key": key,
                                                       "file": file_fingerprint(dirs[m] / "ihvps.safetensors")}))
        step.log.info(f"query iHVPs: chunk {i + 1}/{plan.chunks} ({len(cq)} queries) written")
    for m in s.gradient_methods:  # what an earlier run left beyond this plan, or in the single-folder layout
        root = layout.ihvps(m)
        for f in ("manifest.json", "ihvps.safetensors"):
            (root / f).unlink(missing_ok=True)
        for d in root.glob("chunk_*"):
            if d.is_dir() and int(d.name.split("_")[1]) >= plan.chunks:
                shutil.rmtree(d)
    if resumed:
        step.log.info(f"query iHVPs: resumed, chunks {resumed} were already on disk for the same inputs")
    md: dict[str, Any] = {f"norm/{m}": math.sqrt(v) for m, v in sq.items()}
    md |= {f"plan/{k}": v for k, v in plan.as_dict().items()} | {"resumed_chunks": len(resumed)}
    return md


@asset("query_ihvps", "scores",
       "Measurement gradients ∇m of the queries on θ_ft, preconditioned per method (MS-IF: P_pt P_ft ∇m; "
       "SS-IF: P_ft ∇m; GDP: ∇m), and the queries with the fine-tuned model's answers.",
       deps=["queries", "finetuned_checkpoint", "pretrain_factors", "finetune_factors"],
       settings=["factors.attention_blocks", "factors.modules", "factors.module_tags", "factors.max_length",
                 "scores.damping_pretrain", "scores.damping_finetune", "scores.query_rank"],
       # only the methods with query iHVPs count: adding bm25 or a derived method recomputes none of them
       version_extra=lambda cfg, _: "gradient methods=" + ",".join(sorted(cfg.scores.gradient_methods)),
       kinds=["pytorch", "safetensors", "parquet"], heavy=True, resources=["lakehouse", "device"],
       outputs=lambda lay, k, cfg: [lay.queries, *(lay.ihvps(m) for m in cfg.scores.gradient_methods)])
def query_ihvps(step: Step) -> dg.MaterializeResult:
    """Query iHVPs of every gradient method, and the queries table."""
    from msif_core.api import answer_queries, encode_queries

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
        md |= write_chunks(step, pt, ft, qenc, qids)
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
