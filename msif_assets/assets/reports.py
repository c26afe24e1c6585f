"""SQL and reports: the DuckDB views over every table (``score_tables``), the Markdown/PNG report and,
where the queries carry ``true_doc_ids``, the fact-tracing quality per method."""

from __future__ import annotations

import base64
from typing import Any

import dagster as dg

from msif_core.methods import MIXED

from ..io import write_parquet_atomic, write_text_atomic
from ..markdown import md_table
from ..sources import CORPUS_PARTITIONS
from ..views import create_database, run_named
from .base import Step, Timer, asset


@asset("score_tables", "reports", lambda cfg, _: f"{cfg.root / 'msif.duckdb'}: DuckDB views documents, queries, "
       "candidates, influence_scores (global rank), top_influences.", deps=["influence_scores"],
       settings=["scores.methods", "scores.rrf_k"], kinds=["duckdb"], outputs=lambda lay, k, _: [lay.database])
def score_tables(step: Step) -> dg.MaterializeResult:
    """(Re)write ``msif.duckdb`` with its views and summarise what they hold."""
    layout = step.layout
    t = Timer()
    keys = sorted(step.context.instance.get_dynamic_partitions(CORPUS_PARTITIONS.name))
    missing = [k for k in keys if not layout.scores(k).exists()]
    if missing:
        raise dg.Failure(f"influence_scores partitions {missing} have no table yet; materialise them first")
    create_database(layout, keys, [m for m in step.cfg.scores.methods if m in MIXED], step.cfg.scores.rrf_k)
    con = step.lakehouse.duckdb()
    try:
        stats = con.execute("SELECT count(*), count(DISTINCT query_id), count(DISTINCT doc_id), "
                            "count(DISTINCT method) FROM influence_scores_by_shard").fetchone()
        per_method = con.execute("SELECT method, count(*) AS rows, avg(score) AS mean_score, "
                                 "min(score) AS min_score, max(score) AS max_score FROM influence_scores_by_shard "
                                 "GROUP BY method ORDER BY method").df()
        top = con.execute("SELECT query_id, method, rank, doc_id, score, left(text, 80) AS text "
                          "FROM top_influences WHERE query_id = (SELECT min(query_id) FROM queries WHERE scored) "
                          "AND rank <= 3 ORDER BY method, rank").df()
    finally:
        con.close()
    return dg.MaterializeResult(metadata={
        "rows": stats[0], "queries": stats[1], "documents": stats[2], "methods": stats[3], "shards": len(keys),
        "seconds": round(t.seconds, 3), "database": dg.MetadataValue.path(str(layout.database)),
        "try": dg.MetadataValue.md(f"`duckdb {layout.database}` then `SELECT * FROM top_influences LIMIT 10;`"),
        "per_method": dg.MetadataValue.md(md_table(per_method)),
        "top_3_first_query": dg.MetadataValue.md(md_table(top))})


@asset("attribution_report", "reports", "Top documents per query with their text (Markdown) and a plot (PNG).",
       deps=["score_tables"], kinds=["markdown", "png"],
       outputs=lambda lay, k, _: [lay.reports / "attribution_report.md", lay.reports / "attribution_report.png"])
def attribution_report(step: Step) -> dg.MaterializeResult:
    """``reports/attribution_report.md`` and ``.png``."""
    from ..report import build_report

    reports = step.layout.reports
    md, png, stats = build_report(step.layout, step.cfg)
    write_text_atomic(md, reports / "attribution_report.md")
    write_text_atomic(png, reports / "attribution_report.png")
    b64 = base64.b64encode(png).decode()
    return dg.MaterializeResult(metadata={
        **stats, "report": dg.MetadataValue.md(md + f"\n\n![plot](data:image/png;base64,{b64})\n"),
        "markdown": dg.MetadataValue.path(str(reports / "attribution_report.md")),
        "plot": dg.MetadataValue.path(str(reports / "attribution_report.png"))})


@asset("attribution_quality", "reports", "MRR and Recall@10 per method against the queries' true_doc_ids "
       "(msif_assets/sql/quality.sql).", deps=["score_tables"], kinds=["duckdb", "parquet"],
       when=lambda cfg: cfg.has_ground_truth(), outputs=lambda lay, k, _: [lay.quality])
def attribution_quality(step: Step) -> dg.MaterializeResult:
    """``attribution_quality.parquet``: the named query ``quality`` over the views."""
    con = step.lakehouse.duckdb()
    try:
        q = run_named(con, "quality")
    finally:
        con.close()
    q["candidates"] = str(step.cfg.scores.candidates)
    write_parquet_atomic(q, step.layout.quality)
    md: dict[str, Any] = {"quality": dg.MetadataValue.md(md_table(q)),
                          "queries": int(q.n_queries.max()) if len(q) else 0,
                          "path": dg.MetadataValue.path(str(step.layout.quality))}
    for r in q.itertuples():
        md[f"mrr/{r.method}"] = float(r.mrr)
        md[f"recall_at_10/{r.method}"] = float(r.recall_at_k)
    return dg.MaterializeResult(metadata=md)


NODES = (score_tables, attribution_report, attribution_quality)
