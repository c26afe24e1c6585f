"""msif.duckdb and the named queries in sql/, on a synthetic lakehouse (no models): the rank is global
across shards, top_influences is exact, and every named query runs and agrees with a pandas / msif_core
reference."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from msif_assets.assets import SCORES_SCHEMA
from msif_assets.io import shard_key, write_parquet_atomic
from msif_assets.layout import Layout
from msif_assets.views import SQL_DIR, connect, create_database, run_named

METHODS = ["ms_if", "gdp", "bm25"]
N_DOCS, SHARD, N_Q = 30, 10, 5


def _global_rank(df: pd.DataFrame) -> pd.Series:
    s = df.sort_values(["query_id", "method", "score", "doc_id"], ascending=[True, True, False, True])
    return s.groupby(["query_id", "method"]).cumcount().add(1).reindex(df.index)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, pd.DataFrame, pd.DataFrame]:
    return _write_lake(tmp_path_factory.mktemp("lake"), METHODS)


def _write_lake(root: Path, methods: list[str], mixed: tuple[str, ...] = (), rrf_k: int | None = None,
                unscored: int = 0):
    layout = Layout(root)
    rng = np.random.default_rng(0)
    docs = pd.DataFrame({"doc_id": [f"d{i:02d}" for i in range(N_DOCS)], "text": [f"text {i}" for i in range(N_DOCS)]})
    docs["row"] = np.arange(N_DOCS)
    docs["shard"] = [shard_key(i // SHARD) for i in range(N_DOCS)]
    truth = {f"q{j}": [f"d{(7 * j) % N_DOCS:02d}", f"d{(7 * j + 11) % N_DOCS:02d}"] for j in range(N_Q)}
    queries = pd.DataFrame({"query_id": list(truth), "prompt": "p", "completion": "c",
                            "true_doc_ids": list(truth.values()), "answer": "a", "answer_correct": True,
                            "scored": True})
    write_parquet_atomic(queries, layout.queries)
    rows = []
    for s in range(N_DOCS // SHARD):
        key = shard_key(s)
        part = docs[docs.shard == key]
        write_parquet_atomic(part, layout.documents(key))
        cand = pd.DataFrame([(q, d) for q in truth for d in part.doc_id], columns=["query_id", "doc_id"])
        cand["distance"], cand["neighbour_rank"], cand["shard"] = np.nan, 0, key
        write_parquet_atomic(cand, layout.candidates(key))
        for m in methods:
            t = cand[["query_id", "doc_id"]].copy()
            t["method"] = m
            t["score"] = rng.standard_normal(len(t)).round(2)  # rounding makes ties: tie-break by doc_id
            if m == "ms_if":  # make the true sources strong for ms_if
                t.loc[[d in truth[q] for q, d in zip(t.query_id, t.doc_id)], "score"] += 1.5
                t.iloc[:unscored, t.columns.get_loc("score")] = np.nan  # documents ms_if could not score
            t["mlp_score"] = t.score * 0.25 if m != "bm25" else np.nan
            t["mha_score"] = t.score * 0.75 if m != "bm25" else np.nan
            t["shard"], t["candidate_distance"], t["self_influence"] = key, np.nan, np.nan
            t["damping_pretrain"] = "1e-06" if m == "ms_if" else None
            t["damping_finetune"] = "1e-06" if m == "ms_if" else None
            t["pretrained_version"], t["finetuned_version"] = "sha256:pt", "sha256:ft"
            t = t.sort_values(["query_id", "score", "doc_id"], ascending=[True, False, True])
            t["shard_rank"] = t.groupby("query_id").cumcount() + 1
            rows.append(t)
        write_parquet_atomic(pd.concat([r for r in rows if r.shard.iloc[0] == key])[SCORES_SCHEMA.names],
                             layout.scores(key), schema=SCORES_SCHEMA)
    create_database(layout, mixed=mixed, rrf_k=rrf_k)
    allrows = pd.concat(rows, ignore_index=True)
    allrows["rank"] = _global_rank(allrows)
    return layout, allrows, queries


def test_views_exist_and_work_from_any_folder(lake, tmp_path: Path) -> None:
    layout, allrows, _ = lake
    cwd = os.getcwd()
    os.chdir(tmp_path)  # absolute paths inside the views: the file works wherever it is opened
    try:
        con = duckdb.connect(str(layout.database), read_only=True)
        names = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert {"influence_scores", "documents", "queries", "top_influences", "candidates"} <= names
        assert con.execute("SELECT count(*) FROM influence_scores").fetchone()[0] == len(allrows)
        assert con.execute("SELECT count(*) FROM documents").fetchone()[0] == N_DOCS
        con.close()
    finally:
        os.chdir(cwd)


def test_rank_is_global_across_shards(lake) -> None:
    layout, allrows, _ = lake
    con = connect(layout)
    got = con.execute("SELECT query_id, doc_id, method, rank FROM influence_scores").df()
    con.close()
    merged = got.merge(allrows[["query_id", "doc_id", "method", "rank"]], on=["query_id", "doc_id", "method"],
                       suffixes=("", "_ref"))
    assert len(merged) == len(allrows)
    assert (merged["rank"] == merged["rank_ref"]).all()
    # shard-local ranks are not global ranks: the view must not just pass shard_rank through
    assert (allrows.shard_rank != allrows["rank"]).any()


def test_top_influences_is_the_global_top_10_with_text(lake) -> None:
    layout, allrows, queries = lake
    con = connect(layout)
    top = con.execute("SELECT * FROM top_influences").df()
    con.close()
    ref = allrows[allrows["rank"] <= 10]
    assert len(top) == len(ref)
    m = top.merge(ref, on=["query_id", "method", "doc_id"], suffixes=("", "_ref"))
    assert len(m) == len(ref) and (m["rank"] == m["rank_ref"]).all()
    assert (m.text == "text " + m.doc_id.str[1:].astype(int).astype(str)).all()
    truth = dict(zip(queries.query_id, queries.true_doc_ids))
    assert (m.is_true_source == [d in truth[q] for q, d in zip(m.query_id, m.doc_id)]).all()


def test_top_k_per_query(lake) -> None:
    layout, allrows, _ = lake
    con = connect(layout)
    got = run_named(con, "top_k_per_query", k=3)
    con.close()
    ref = allrows[allrows["rank"] <= 3].sort_values(["query_id", "method", "rank"])
    assert got[["query_id", "method", "rank", "doc_id"]].values.tolist() == \
        ref[["query_id", "method", "rank", "doc_id"]].values.tolist()
    assert got.text.notna().all()


def test_quality_matches_msif_core_metrics(lake) -> None:
    from msif_core.metrics import evaluate_rankings

    layout, allrows, queries = lake
    con = connect(layout)
    got = run_named(con, "quality").set_index("method")
    con.close()
    doc_ids = sorted(allrows.doc_id.unique())
    scores = {}
    for m in METHODS:
        piv = allrows[allrows.method == m].pivot(index="doc_id", columns="query_id", values="score")
        scores[m] = piv.loc[doc_ids, list(queries.query_id)].to_numpy()
    ref = evaluate_rankings(scores, doc_ids, list(queries.true_doc_ids), query_ids=list(queries.query_id))
    for r in ref.itertuples():
        assert got.loc[r.method, "mrr"] == pytest.approx(r.mrr)
        assert got.loc[r.method, "recall_at_k"] == pytest.approx(r.recall_at_10)
        assert got.loc[r.method, "n_queries"] == N_Q
    assert got.loc["ms_if", "mrr"] > got.loc["gdp", "mrr"]


def test_mlp_vs_attention_and_agreement(lake) -> None:
    layout, _, _ = lake
    con = connect(layout)
    split = run_named(con, "mlp_vs_attention").set_index("method")
    agree = run_named(con, "method_agreement")
    con.close()
    assert set(split.index) == {"ms_if", "gdp"}  # bm25 has no block split
    assert split.mlp_share_abs.to_numpy() == pytest.approx([0.25, 0.25])
    assert len(agree) == 3  # three pairs of three methods
    assert agree.mean_top_k_overlap.between(0, 1).all() and (agree.queries == N_Q).all()


def test_named_queries_all_run(lake) -> None:
    layout, _, _ = lake
    names = sorted(p.stem for p in SQL_DIR.glob("*.sql"))
    assert {"top_k_per_query", "mlp_vs_attention", "method_agreement", "quality"} <= set(names)
    con = connect(layout)
    for n in names:
        assert len(run_named(con, n)) > 0, n
    with pytest.raises(ValueError, match="no variable 'kk'"):
        run_named(con, "top_k_per_query", kk=3)
    con.close()


def test_database_rewrite_is_atomic_and_idempotent(lake) -> None:
    layout, allrows, _ = lake
    before = layout.database.stat().st_ino
    create_database(layout)
    assert layout.database.stat().st_ino != before  # replaced by rename, never written in place
    assert not list(layout.root.glob(".msif.duckdb*"))
    con = connect(layout)
    assert con.execute("SELECT count(*) FROM influence_scores").fetchone()[0] == len(allrows)
    con.close()


@pytest.mark.parametrize("rrf_k", [None, 60])
def test_fused_ranking_is_reciprocal_rank_fusion_across_shards(tmp_path: Path, rrf_k: int | None) -> None:
    """ms_if_rrf (a mixed method, computed by the views): per query and document Σ 1/(k + global rank) over
    MS-IF and the retriever, ranks across all shards with ties by doc_id (a NaN score is no rank and no term);
    ranked inside its shard like a stored method; in quality and top_influences. Checked against an explicit
    pandas computation, and msif_core's rrf_scores against the same."""
    from msif_core.methods import RRF_K, rrf_scores
    from msif_core.metrics import evaluate_rankings

    k = RRF_K if rrf_k is None else rrf_k
    layout, allrows, queries = _write_lake(tmp_path, ["ms_if", "retriever"], mixed=("ms_if_rrf",), rrf_k=rrf_k,
                                           unscored=3)
    assert allrows.score.isna().sum() == 3 * (N_DOCS // SHARD)  # three per shard, all of the first query
    scored = allrows[allrows.score.notna()].copy()
    scored["rank"] = _global_rank(scored)
    want = scored[["query_id", "doc_id", "method", "rank", "shard"]].copy()
    want["term"] = 1.0 / (k + want["rank"])
    want = want.groupby(["query_id", "doc_id"]).agg(score=("term", "sum"), shard=("shard", "first")).reset_index()
    con = connect(layout)
    got = con.execute("SELECT query_id, doc_id, score, shard, shard_rank FROM influence_scores_by_shard "
                      "WHERE method = 'ms_if_rrf' ORDER BY query_id, doc_id").df()
    quality = run_named(con, "quality").set_index("method")
    top = con.execute("SELECT query_id, rank, doc_id FROM top_influences WHERE method = 'ms_if_rrf' "
                      "ORDER BY query_id, rank").df()
    global_rank = con.execute("SELECT query_id, doc_id, rank FROM influence_scores WHERE method = 'ms_if_rrf'").df()
    con.close()
    pd.testing.assert_frame_equal(got[["query_id", "doc_id", "shard"]], want[["query_id", "doc_id", "shard"]])
    np.testing.assert_allclose(got.score, want.score, rtol=1e-12)
    expect_shard_rank = got.sort_values(["query_id", "shard", "score", "doc_id"], ascending=[True, True, False, True])
    assert (expect_shard_rank.groupby(["query_id", "shard"]).cumcount() + 1).reindex(got.index).tolist() \
        == got.shard_rank.tolist()
    doc_ids = sorted(allrows.doc_id.unique())
    qids = list(queries.query_id)
    mats = {m: allrows[allrows.method == m].pivot(index="doc_id", columns="query_id", values="score")
            .loc[doc_ids, qids].to_numpy() for m in ("ms_if", "retriever")}
    fused = rrf_scores(mats["ms_if"], mats["retriever"], k=k)
    np.testing.assert_allclose(fused, want.pivot(index="doc_id", columns="query_id", values="score")
                               .loc[doc_ids, qids].to_numpy(), rtol=1e-12)
    ref = evaluate_rankings({"ms_if_rrf": fused}, doc_ids, list(queries.true_doc_ids), query_ids=qids)
    assert quality.loc["ms_if_rrf", "mrr"] == pytest.approx(float(ref.mrr.iloc[0]))
    first = global_rank.merge(want, on=["query_id", "doc_id"]).sort_values(["query_id", "rank"])
    assert top.groupby("query_id").doc_id.apply(list).to_dict() == \
        first[first["rank"] <= 10].groupby("query_id").doc_id.apply(list).to_dict()


def test_rrf_scores_skips_unscored_documents() -> None:
    from msif_core.methods import rrf_scores

    a = np.array([[3.0], [1.0], [np.nan], [2.0]])
    b = np.array([[0.0], [5.0], [4.0], [4.0]])  # a tie: the earlier document ranks first
    want = [1 / 61 + 1 / 64, 1 / 63 + 1 / 61, 1 / 62, 1 / 62 + 1 / 63]
    np.testing.assert_allclose(rrf_scores(a, b, k=60)[:, 0], want, rtol=1e-15)
    assert np.isnan(rrf_scores(np.array([[np.nan], [1.0]]), np.array([[np.nan], [2.0]]))[0, 0])  # scored by none
    np.testing.assert_allclose(rrf_scores(a, b, k=1, weights=(2.0, 1.0))[:, 0],
                               [2 / 2 + 1 / 5, 2 / 4 + 1 / 2, 1 / 3, 2 / 3 + 1 / 4], rtol=1e-15)
    with pytest.raises(ValueError, match="differ in shape"):
        rrf_scores(a, b[:3])
