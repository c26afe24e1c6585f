"""``<root>/msif.duckdb``: DuckDB views over the Parquet tables, and the named queries in ``msif_assets/sql/``.

Views (absolute paths, so ``duckdb <root>/msif.duckdb`` works from any folder; ``score_tables`` names the
current shards' files, so a stray file in a table folder is not read, and a moved lakehouse rebuilds it):

- ``documents`` (doc_id, text, shard, row), ``queries`` (query_id, prompt, completion, true_doc_ids,
  answer, answer_correct, scored), ``candidates`` (query_id, doc_id, distance, neighbour_rank, shard);
- ``stored_scores``: the rows of the influence_scores tables, with ``shard_rank`` = rank inside the shard;
- ``influence_scores_by_shard``: the stored rows and those of the mixed methods the experiment lists
  (``ms_if_rrf``: a fusion of stored rankings, computed here across all shards);
- ``influence_scores``: the same rows with ``rank`` = rank across all shards per query and method
  (1 = most supporting: score descending, ties by doc_id);
- ``top_influences``: the top 10 per query and method joined with the document text and the query, with
  ``is_true_source`` where ground truth exists. It reads only rows with ``shard_rank <= 10``: a global
  top-10 row is a top-10 row of its own shard, so the answer is exact and fast on large tables.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import duckdb
import pandas as pd

from msif_core.tables import RANK_ORDER_SQL

from .layout import Layout

SQL_DIR = Path(__file__).resolve().parent / "sql"  # package data: the named queries
TOP_K = 10


def _lit(p: Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def _files(paths: list[Path]) -> str:
    return "[" + ", ".join(_lit(p) for p in paths) + "]"


def fused_rows_sql(method: str, k: int | None = None) -> str:
    """The rows of the mixed method ``method`` (:data:`msif_core.methods.MIXED`): per query and document,
    Σ 1 / (k + rank) (default :data:`msif_core.methods.RRF_K`) over the fused methods' ranks across all shards
    (a document one of them did not score gets no term from it), with its rank inside its shard; damping and
    MLP columns are NULL (a ranking, not a score of the model)."""
    from msif_core.methods import MIXED, RRF_K

    parts = ", ".join(f"'{m}'" for m in MIXED[method])
    k = RRF_K if k is None else int(k)
    return (f"WITH r AS (SELECT query_id, doc_id, shard, candidate_distance, pretrained_version, finetuned_version, "
            f"row_number() OVER (PARTITION BY query_id, method {RANK_ORDER_SQL}) AS r FROM stored_scores "
            f"WHERE method IN ({parts}) AND score IS NOT NULL AND NOT isnan(score)), "
            f"f AS (SELECT query_id, doc_id, '{method}' AS method, sum(1.0 / ({k} + r)) AS score, "
            "any_value(shard) AS shard, any_value(candidate_distance) AS candidate_distance, "
            "any_value(pretrained_version) AS pretrained_version, any_value(finetuned_version) AS finetuned_version "
            "FROM r GROUP BY query_id, doc_id) "
            f"SELECT *, row_number() OVER (PARTITION BY query_id, method, shard {RANK_ORDER_SQL}) AS shard_rank "
            "FROM f")


def view_statements(layout: Layout, shards: list[str] | None = None, mixed: Sequence[str] = (),
                    rrf_k: int | None = None) -> list[str]:
    """The CREATE VIEW statements for ``layout``: over the tables of ``shards`` by name (a stray file in a
    table folder is not read), or of every file in the folders when ``shards`` is None; ``mixed`` methods
    (rankings fused from stored ones with constant ``rrf_k``, :func:`fused_rows_sql`) are added to
    ``influence_scores_by_shard``."""
    t = layout.tables
    if shards:
        docs, cands, scores = (_files([f(k) for k in shards])
                               for f in (layout.documents, layout.candidates, layout.scores))
    else:
        docs, cands, scores = (_lit(t / d / "*.parquet") for d in ("documents", "candidates", "influence_scores"))
    return [
        f"CREATE OR REPLACE VIEW documents AS SELECT doc_id, text, shard, \"row\" FROM read_parquet({docs})",
        f"CREATE OR REPLACE VIEW queries AS SELECT * FROM read_parquet({_lit(layout.queries)})",
        f"CREATE OR REPLACE VIEW candidates AS SELECT * FROM read_parquet({cands})",
        f"CREATE OR REPLACE VIEW stored_scores AS SELECT * FROM read_parquet({scores})",
        "CREATE OR REPLACE VIEW influence_scores_by_shard AS SELECT * FROM stored_scores"
        + "".join(f" UNION ALL BY NAME ({fused_rows_sql(m, rrf_k)})" for m in mixed),
        "CREATE OR REPLACE VIEW influence_scores AS SELECT query_id, doc_id, method, score, "
        f"row_number() OVER (PARTITION BY query_id, method {RANK_ORDER_SQL}) AS rank, mlp_score, mha_score, "
        "self_influence, damping_pretrain, damping_finetune, pretrained_version, finetuned_version, shard, "
        "shard_rank, candidate_distance FROM influence_scores_by_shard",
        "CREATE OR REPLACE VIEW top_influences AS "
        f"WITH top AS (SELECT *, row_number() OVER (PARTITION BY query_id, method {RANK_ORDER_SQL}) AS rank "
        f"FROM influence_scores_by_shard WHERE shard_rank <= {TOP_K}) "
        "SELECT t.query_id, q.prompt, q.completion, q.answer, t.method, t.rank, t.score, t.mlp_score, "
        "t.mha_score, t.doc_id, d.text, list_contains(q.true_doc_ids, t.doc_id) AS is_true_source "
        f"FROM top t JOIN queries q USING (query_id) JOIN documents d USING (doc_id) WHERE t.rank <= {TOP_K}",
        "COMMENT ON VIEW influence_scores IS 'rank 1 = most supporting: score descending per query and method, "
        "across all shards (positive score: upweighting the document lowers the completion loss)'",
        f"COMMENT ON VIEW top_influences IS 'top {TOP_K} documents per query and method, with text'",
    ]


def create_database(layout: Layout, shards: list[str] | None = None, mixed: Sequence[str] = (),
                    rrf_k: int | None = None) -> Path:
    """(Re)write ``msif.duckdb`` with the views (over ``shards``' tables, with the ``mixed`` methods' rows of
    constant ``rrf_k``, see :func:`view_statements`), atomically (temporary file + rename)."""
    target = layout.database
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        try:
            for stmt in view_statements(layout, shards, mixed, rrf_k):
                con.execute(stmt)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def connect(layout: Layout | Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection to ``msif.duckdb`` (given a layout or the file)."""
    path = layout.database if isinstance(layout, Layout) else Path(layout)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; materialise score_tables first (msif run)")
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as e:
        from .io import CorruptTableError

        raise CorruptTableError(f"{path} is not a readable DuckDB database ({e}). Fix: `msif run` (it rebuilds it "
                                f"when it was changed since score_tables wrote it), or delete it and run again") from e


def named_sql(name: str) -> str:
    """The text of ``sql/<name>.sql``."""
    p = SQL_DIR / f"{name}.sql"
    if not p.exists():
        raise FileNotFoundError(f"no named query {p}; available: {sorted(f.stem for f in SQL_DIR.glob('*.sql'))}")
    return p.read_text(encoding="utf-8")


_SET = re.compile(r"^\s*SET\s+VARIABLE\s+(\w+)\s*=.*$", re.IGNORECASE | re.MULTILINE)


def run_named(con: duckdb.DuckDBPyConnection, name: str, **variables) -> pd.DataFrame:
    """Run ``sql/<name>.sql`` (its ``SET VARIABLE`` defaults overridden by ``variables``) and return the
    result of its last statement."""
    text = named_sql(name)
    for k, v in variables.items():
        text, n = re.subn(rf"^\s*SET\s+VARIABLE\s+{k}\s*=.*$", f"SET VARIABLE {k} = {v!r};", text,
                          flags=re.IGNORECASE | re.MULTILINE)
        if n == 0:
            raise ValueError(f"sql/{name}.sql has no variable {k!r} (it sets {_SET.findall(text)})")
    statements = [s for s in _split(text) if s.strip()]
    for s in statements[:-1]:
        con.execute(s)
    return con.execute(statements[-1]).df()


def _split(text: str) -> list[str]:
    """Split SQL on semicolons outside quotes and comments."""
    out, buf, quote, i = [], [], None, 0
    while i < len(text):
        ch = text[i]
        if quote is None and text.startswith("--", i):
            j = text.find("\n", i)
            j = len(text) if j < 0 else j
            buf.append(text[i:j])
            i = j
            continue
        if ch in "'\"":
            quote = None if quote == ch else (ch if quote is None else quote)
        if ch == ";" and quote is None:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    out.append("".join(buf))
    return [s for s in out if re.sub(r"--[^\n]*", "", s).strip()]
