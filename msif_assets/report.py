"""The attribution report: for a few queries, the model's answer and the top documents with their text;
per-method quality where ground truth exists; a PNG with the quality bars and the MLP/attention split."""

from __future__ import annotations

import io
from typing import Any

from msif_core.methods import MIXED, headline

from .config import ExperimentConfig
from .layout import Layout
from .markdown import md_table
from .views import connect, run_named

REPORT_QUERIES = 5
REPORT_TOP = 5


def report_data(layout: Layout, n_queries: int = REPORT_QUERIES, top: int = REPORT_TOP,
                method: str | None = None) -> dict[str, Any]:
    """Queries, their top documents (by ``method``, default MS-IF or the first method) and quality."""
    con = connect(layout)
    try:
        methods = [r[0] for r in con.execute("SELECT DISTINCT method FROM influence_scores_by_shard").fetchall()]
        if method is None:
            method = headline(methods)
        queries = con.execute(
            "SELECT query_id, prompt, completion, answer, answer_correct, true_doc_ids FROM queries WHERE scored "
            "ORDER BY query_id LIMIT ?", [n_queries]).df()
        tops = con.execute(
            "SELECT query_id, rank, doc_id, score, mlp_score, mha_score, text, is_true_source FROM top_influences "
            "WHERE method = ? AND rank <= ? AND query_id IN (SELECT query_id FROM queries WHERE scored "
            "ORDER BY query_id LIMIT ?) ORDER BY query_id, rank", [method, top, n_queries]).df()
        has_truth = con.execute("SELECT count(*) FROM queries WHERE scored AND true_doc_ids IS NOT NULL "
                                "AND len(true_doc_ids) > 0").fetchone()[0] > 0
        quality = run_named(con, "quality") if has_truth else None
        split = run_named(con, "mlp_vs_attention")
    finally:
        con.close()
    return {"method": method, "methods": methods, "queries": queries, "top": tops, "quality": quality,
            "split": split}


def render_markdown(data: dict[str, Any], cfg: ExperimentConfig | None = None) -> str:
    """The report as Markdown."""
    lines = [f"# Attribution report ({data['method']})", "",
             "Positive score: upweighting the document lowers the loss of the completion (it supports the "
             "answer). Rank 1 = most supporting, across all shards."]
    if cfg is not None:
        lines.append(f"Candidates per query and shard: {cfg.scores.candidates}; damping pre-train "
                     f"{cfg.scores.damping_pretrain}, fine-tune {cfg.scores.damping_finetune}.")
    for q in data["queries"].itertuples():
        lines += ["", f"## {q.query_id}: {' '.join(q.prompt.split())} → {str(q.completion).strip()}"]
        if q.answer is not None:
            mark = "" if q.answer_correct is None else (" ✓" if q.answer_correct else " ✗")
            lines.append(f"Fine-tuned model's answer: **{str(q.answer).strip()}**{mark}")
        rows = data["top"][data["top"].query_id == q.query_id]
        if len(rows):
            t = rows[["rank", "doc_id", "score", "is_true_source", "text"]].copy()
            t["text"] = t.text.str.slice(0, 140)
            t["is_true_source"] = t.is_true_source.map({True: "✓", False: "", None: ""})
            lines += ["", md_table(t.rename(columns={"is_true_source": "true source"}))]
    if data["quality"] is not None and len(data["quality"]):
        q = data["quality"][["method", "n_queries", "mrr", "recall_at_k"]]
        q = q.rename(columns={"recall_at_k": "recall_at_10"})
        q["kind"] = q.method.map(lambda m: "mixed: " + " + ".join(MIXED[m]) if m in MIXED else "")
        lines += ["", "## Quality (MRR, Recall@10 per method)", "", md_table(q)]
    if len(data["split"]):
        lines += ["", "## MLP vs attention share of the score (top 10 per query)", "", md_table(data["split"])]
    return "\n".join(lines) + "\n"


def render_png(data: dict[str, Any]) -> bytes:
    """Two panels: MRR / Recall@10 per method (or the score spread), and the MLP share per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    q = data["quality"]
    if q is not None and len(q):
        q = q.sort_values("mrr", ascending=False)
        x = range(len(q))
        ax.bar([i - 0.2 for i in x], q.mrr, width=0.4, label="MRR")
        ax.bar([i + 0.2 for i in x], q.recall_at_k, width=0.4, label="Recall@10")
        ax.set_xticks(list(x), q.method)
        ax.set_ylim(0, 1)
        ax.set_title("Fact tracing quality")
        ax.legend()
    else:
        t = data["top"]
        ax.hist(t.score, bins=20) if len(t) else None
        ax.set_title(f"Top-{REPORT_TOP} scores ({data['method']})")
    ax = axes[1]
    s = data["split"]
    if len(s):
        ax.bar(s.method, s.mlp_share_abs.fillna(0), label="MLP")
        ax.bar(s.method, 1 - s.mlp_share_abs.fillna(0), bottom=s.mlp_share_abs.fillna(0), label="attention")
        ax.set_ylim(0, 1)
        ax.legend()
    ax.set_title("Share of |score| by block kind (top 10)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def build_report(layout: Layout, cfg: ExperimentConfig | None = None) -> tuple[str, bytes, dict[str, Any]]:
    """(markdown, png bytes, numeric metadata)."""
    data = report_data(layout)
    stats: dict[str, Any] = {"method": data["method"], "queries_shown": len(data["queries"])}
    if len(data["top"]):
        stats["true_sources_in_shown_top"] = int(data["top"].is_true_source.fillna(False).sum())
    return render_markdown(data, cfg), render_png(data), stats
