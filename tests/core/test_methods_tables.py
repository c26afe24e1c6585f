"""The method registry and the one rank rule: the API's table, the pipeline's shard ranks and the SQL views
order every query's documents the same way (score descending, ties by doc_id, missing scores last)."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from msif_core import methods
from msif_core.api import scores_table
from msif_core.methods import MethodScores
from msif_core.settings import FactorSettings, ScoreSettings, describe
from msif_core.tables import RANK_ORDER_SQL, long_table, with_rank


def test_registry() -> None:
    assert methods.DEFAULT_METHODS == ("ms_if", "ss_if", "gdp", "repsim", "bm25", "retriever")
    assert methods.ALL_METHODS == methods.DEFAULT_METHODS + ("ms_if_unit", "ms_if_cosine", "ms_if_rrf")  # no index
    assert ScoreSettings().methods == methods.DEFAULT_METHODS
    assert methods.GRADIENT_METHODS == ("ms_if", "ss_if", "gdp")
    assert methods.needs_pretrain_factors(["gdp", "ms_if"]) and not methods.needs_pretrain_factors(["ss_if", "bm25"])
    assert methods.needs_finetune_factors(["ss_if"]) and not methods.needs_finetune_factors(["gdp", "repsim"])
    assert methods.get("ss_if").document_model == "finetuned" and methods.get("ms_if").document_model == "pretrained"
    assert methods.damping_columns("ms_if", 1e-4, "relative:0.1") == {"damping_pretrain": "0.0001",
                                                                      "damping_finetune": "relative:0.1"}
    assert methods.damping_columns("gdp", 1, 2) == {"damping_pretrain": None, "damping_finetune": None}
    assert methods.headline(["gdp", "bm25"]) == "bm25" and methods.headline(["gdp", "ms_if"]) == "ms_if"
    with pytest.raises(ValueError, match="unknown method 'msif'.*known"):
        methods.get("msif")


def test_settings_are_defined_once_with_help() -> None:
    from msif_core.settings import IndexSettings

    for cls in (FactorSettings, ScoreSettings, IndexSettings):
        for name, _, help_text in describe(cls):
            assert help_text, f"{cls.__name__}.{name} has no help"
    from msif_core.api import AttributionSettings
    from msif_core.ekfac import FitSettings

    # the API and the fit take their defaults from the one definition
    assert AttributionSettings().max_examples == FactorSettings().max_examples == FitSettings().max_examples
    assert AttributionSettings().damping_pretrain == ScoreSettings().damping_pretrain


def _scores_with_ties() -> tuple[np.ndarray, list[str], list[str]]:
    s = np.array([[1.0, 0.5], [2.0, np.nan], [1.0, 0.5], [-3.0, 0.5]])  # docs x queries: ties and a NaN
    return s, ["d9", "d1", "d2", "d0"], ["qa", "qb"]


def test_long_table_layout() -> None:
    s, docs, qs = _scores_with_ties()
    df = long_table(s, docs, qs, "gdp", mlp=s / 2, mha=s / 2)
    assert list(df.query_id) == ["qa"] * 4 + ["qb"] * 4 and list(df.doc_id) == docs * 2
    np.testing.assert_array_equal(df.score.to_numpy(), s.T.reshape(-1))
    assert long_table(s, docs, qs, "bm25").mlp_score.isna().all()
    with pytest.raises(ValueError, match="doc_ids"):
        long_table(s, docs[:3], qs, "gdp")


def test_one_rank_rule_everywhere(tmp_path) -> None:
    s, docs, qs = _scores_with_ties()
    want = {"qa": ["d1", "d2", "d9", "d0"],  # 2 > 1 = 1 (d2 before d9) > -3
            "qb": ["d0", "d2", "d9", "d1"]}  # 0.5 ties by doc_id, NaN last
    pipeline = with_rank(long_table(s, docs, qs, "gdp"), "shard_rank")
    api = scores_table(MethodScores(s), "gdp", docs, qs)
    con = duckdb.connect()
    path = tmp_path / "scores.parquet"  # Parquet keeps the NaN as NaN (DuckDB would sort it first)
    long_table(s, docs, qs, "gdp").to_parquet(path)
    sql = con.execute(f"SELECT query_id, doc_id, row_number() OVER (PARTITION BY query_id, method {RANK_ORDER_SQL}) "
                      f"AS rank FROM read_parquet('{path}')").df()
    for q, order in want.items():
        assert list(pipeline[pipeline.query_id == q].sort_values("shard_rank").doc_id) == order
        assert list(api[api.query_id == q].sort_values("rank").doc_id) == order
        assert list(sql[sql.query_id == q].sort_values("rank").doc_id) == order
    # the API keeps the matrix's order (query-major) and only adds the rank
    assert list(api.doc_id) == docs * 2


def test_sql_files_rank_by_the_rule() -> None:
    from msif_assets.layout import Layout
    from msif_assets.views import SQL_DIR, view_statements

    files = sorted(SQL_DIR.glob("*.sql"))
    assert files, SQL_DIR
    for f in files:
        text = f.read_text()
        if "row_number()" in text:
            assert RANK_ORDER_SQL in text, f
    ranked = [v for v in view_statements(Layout(pd.io.common.Path("/x"))) if "row_number()" in v]
    assert ranked and all(RANK_ORDER_SQL in v for v in ranked)
