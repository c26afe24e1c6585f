"""The whole asset graph on a tiny world, in-process: every asset and partition materialises, the checks
pass, the rank is global, a rerun is idempotent, a corrupt shard fails only its partition with a clear
error and leaves every earlier table intact, and the checks fail on bad values."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.pipeline import build_world, make_pipeline, materializations_since

from msif_assets.checks import factors_problems, score_problems
from msif_assets.layout import Layout
from msif_assets.views import connect, create_database

SHARDS = ["shard_00000", "shard_00001", "shard_00002"]
PARTITIONED = ["corpus_shards", "corpus_embeddings", "candidates", "influence_scores"]
FIT = ["pretrain_covariance_sums", "pretrain_lambda_sums"]
SINGLE = ["pretrain_eigenbasis", "pretrain_factors", "finetune_factors", "query_ihvps", "score_tables",
          "attribution_report", "attribution_quality"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("world")
    toml = build_world(root, n_docs=40, shard_size=16, candidates=6,
                       methods=("ms_if", "ss_if", "gdp", "repsim", "bm25", "retriever", "ms_if_rrf"))
    cfg, defs, pipe = make_pipeline(toml)
    first = pipe.update()
    return cfg, defs, pipe, first


def scores_frame(layout: Layout) -> pd.DataFrame:
    con = connect(layout)
    df = con.execute("SELECT query_id, doc_id, method, score, rank, mlp_score, mha_score FROM influence_scores "
                     "ORDER BY query_id, method, rank").df()
    con.close()
    return df


def test_everything_materialises(run) -> None:
    cfg, defs, pipe, first = run
    assert not first.failures, [r.error for r in first.failures]
    done = materializations_since(pipe.instance, 0)
    expected = {(a, s) for a in PARTITIONED + FIT for s in SHARDS} | {(a, None) for a in SINGLE}
    assert done == expected
    assert pipe.instance.get_dynamic_partitions("corpus_shards") == SHARDS
    # the partitioned assets really are partitioned in the definitions
    graph = defs.resolve_asset_graph()
    for a in PARTITIONED + FIT:
        assert graph.get(dg.AssetKey(a)).partitions_def is not None
    # every asset carries a code version and an automation condition, heavy steps a concurrency pool
    for a in PARTITIONED + FIT + SINGLE:
        node = graph.get(dg.AssetKey(a))
        assert node.code_version and node.automation_condition is not None, a
    # on the CPU there is no accelerator to share: no pool; on a GPU the heavy steps are in the pool
    assert not graph.get(dg.AssetKey("influence_scores")).pools
    from msif_assets.build import build_definitions
    from msif_assets.resources import DeviceResource

    gpu = build_definitions(cfg, device=DeviceResource(device="cuda")).resolve_asset_graph()
    assert gpu.get(dg.AssetKey("influence_scores")).pools == {"msif_accelerator"}
    assert not gpu.get(dg.AssetKey("corpus_shards")).pools
    # a second pass finds nothing to do
    again = pipe.update()
    assert again.runs == []


def test_tables_and_metadata(run) -> None:
    cfg, _, pipe, _ = run
    layout = Layout(cfg.root)
    every = scores_frame(layout)
    assert set(every.method) == {"ms_if", "ss_if", "gdp", "repsim", "bm25", "retriever", "ms_if_rrf"}
    df = every[every.method != "ms_if_rrf"]  # the stored methods (the fused ranking is computed by the views)
    assert len(df) == 6 * 6 * 6 * 3  # methods × queries × candidates per shard × shards
    assert np.isfinite(df.score).all()
    grad = df[df.method.isin(["ms_if", "ss_if", "gdp"])]
    np.testing.assert_allclose(grad.mlp_score + grad.mha_score, grad.score, rtol=1e-6, atol=1e-9)
    # rank is global: recompute it from the union of the per-shard Parquet files
    raw = pd.concat([pd.read_parquet(layout.scores(k)) for k in SHARDS], ignore_index=True)
    raw = raw.sort_values(["query_id", "method", "score", "doc_id"], ascending=[True, True, False, True])
    raw["rank"] = raw.groupby(["query_id", "method"]).cumcount() + 1
    m = df.merge(raw, on=["query_id", "doc_id", "method"], suffixes=("", "_ref"))
    assert len(m) == len(df) and (m["rank"] == m["rank_ref"]).all()
    assert (raw.shard_rank != raw["rank"]).any()
    # the retriever's scores are the candidates' cosine similarities, its shard ranks their neighbour ranks
    ret = raw[raw.method == "retriever"].merge(
        pd.concat([pd.read_parquet(layout.candidates(k)) for k in SHARDS]), on=["query_id", "doc_id", "shard"])
    np.testing.assert_allclose(ret.score, 1 - ret.distance, rtol=0, atol=1e-12)
    assert (ret.shard_rank == ret.neighbour_rank).all()
    cols = set(raw.columns)
    assert {"damping_pretrain", "damping_finetune", "pretrained_version", "finetuned_version"} <= cols
    assert set(raw[raw.method == "ms_if"].damping_finetune) == {"relative:0.1"}
    assert raw.pretrained_version.str.startswith("sha256:").all()
    # reports and quality
    assert (layout.reports / "attribution_report.png").read_bytes()[:4] == b"\x89PNG"
    assert "Attribution report" in (layout.reports / "attribution_report.md").read_text()
    quality = pd.read_parquet(layout.quality)
    assert set(quality.method) == set(every.method) and quality.mrr.between(0, 1).all()
    assert "mixed: ms_if + retriever" in (layout.reports / "attribution_report.md").read_text()
    fused = every[every.method == "ms_if_rrf"]  # one row per candidate pair, from the global ranks of both
    from msif_core.methods import RRF_K

    both = df[df.method.isin(["ms_if", "retriever"])].assign(term=lambda x: 1 / (RRF_K + x["rank"]))
    want = both.groupby(["query_id", "doc_id"]).term.sum()
    got = fused.set_index(["query_id", "doc_id"]).score
    np.testing.assert_allclose(got.loc[want.index], want, rtol=1e-12)
    assert len(got) == len(want)
    # materialisation metadata a person reads at a glance
    ev = pipe.instance.get_latest_materialization_event(dg.AssetKey("finetune_factors")).asset_materialization
    assert {"tokens_per_second", "seconds", "sequences", "blocks_table", "truncated_sequences"} <= set(ev.metadata)
    # the one over-long document (d002, shard 0) is counted where it is cut: its fit shard, and the
    # pre-train factors assembled from every shard's Λ sums
    recs = pipe.instance.get_event_records(
        dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION,
                              asset_key=dg.AssetKey("pretrain_covariance_sums")), limit=100)
    cut = {r.event_log_entry.asset_materialization.partition:
           r.event_log_entry.asset_materialization.metadata["truncated_documents"].value for r in recs}
    assert cut == {"shard_00000": 1, "shard_00001": 0, "shard_00002": 0}
    ev = pipe.instance.get_latest_materialization_event(dg.AssetKey("pretrain_factors")).asset_materialization
    assert ev.metadata["truncated_sequences"].value == 1
    ev = pipe.instance.get_latest_materialization_event(dg.AssetKey("influence_scores")).asset_materialization
    assert "truncated_documents" in ev.metadata
    ev = pipe.instance.get_latest_materialization_event(dg.AssetKey("attribution_report")).asset_materialization
    assert "data:image/png;base64," in ev.metadata["report"].value


def test_checks_passed(run) -> None:
    _, _, pipe, _ = run
    recs = pipe.instance.get_event_records(dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION),
                                           limit=1000)
    evals = {(r.event_log_entry.dagster_event.event_specific_data.asset_key.to_user_string(),
              r.event_log_entry.dagster_event.event_specific_data.check_name):
             r.event_log_entry.dagster_event.event_specific_data.passed for r in recs}
    assert evals == {(a, c): True for a in ("pretrain_factors", "finetune_factors")
                     for c in ("factors_finite", "lambda_nonnegative")} | \
        {("score_tables", c): True for c in ("scores_finite", "every_query_has_its_rows", "no_duplicate_rows",
                                             "outputs_intact")}


def test_rerun_is_idempotent(run) -> None:
    cfg, _, pipe, _ = run
    layout = Layout(cfg.root)
    before = scores_frame(layout)
    res = pipe.materialize_all()
    assert not res.failures and len(res.materialized) == len(SHARDS) * 6 + len(SINGLE)
    after = scores_frame(layout)
    assert len(after) == len(before)
    assert not after.duplicated(["query_id", "doc_id", "method"]).any()
    pd.testing.assert_frame_equal(before[["query_id", "doc_id", "method", "rank"]],
                                  after[["query_id", "doc_id", "method", "rank"]])
    np.testing.assert_allclose(after.score, before.score, rtol=1e-5, atol=1e-6)
    assert not list(layout.tables.rglob("*.tmp"))


def test_corrupt_shard_fails_only_its_partition(run) -> None:
    cfg, _, pipe, _ = run
    layout = Layout(cfg.root)
    scores_before = {k: layout.scores(k).read_bytes() for k in SHARDS}
    db_rows = len(scores_frame(layout))
    bad = layout.documents("shard_00001")
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"PAR1 this is not a parquet file")
    try:
        recs = pipe.execute([(dg.AssetKey("influence_scores"), k) for k in SHARDS])
        by_part = {r.partition: r for r in recs}
        assert by_part["shard_00000"].success and by_part["shard_00002"].success
        failed = by_part["shard_00001"]
        assert not failed.success
        assert str(bad) in failed.error and "not a readable Parquet file" in failed.error
        assert "Fix: rematerialise partition shard_00001 of corpus_shards" in failed.error
        # the failed partition's earlier table is untouched, the others were rewritten, the views still work
        assert layout.scores("shard_00001").read_bytes() == scores_before["shard_00001"]
        assert len(scores_frame(layout)) == db_rows
        assert len(pd.read_parquet(layout.scores("shard_00000"))) > 0
    finally:
        bad.write_bytes(good_bytes)
    recs = pipe.execute([(dg.AssetKey("influence_scores"), "shard_00001")])
    assert recs[0].success


def test_factor_checks_fail_on_bad_values(run, tmp_path: Path) -> None:
    from msif_core.ekfac import Factors

    cfg, _, _, _ = run
    src = Layout(cfg.root).pretrain_factors
    assert factors_problems(src) == {"finite": [], "nonnegative": []}
    bad = tmp_path / "factors"
    f = Factors.load(src)
    name = next(iter(f.lam))
    f.lam[name] = f.lam[name].clone()
    f.lam[name][0, 0, 0] = -1.0
    f.q_a[name] = f.q_a[name].clone()
    f.q_a[name][0, 0] = torch.nan
    f.save(bad)
    probs = factors_problems(bad)
    assert len(probs["nonnegative"]) == 1 and name in probs["nonnegative"][0]
    assert len(probs["finite"]) == 1 and "Q_A" in probs["finite"][0]


def test_score_checks_fail_on_bad_values(run, tmp_path: Path) -> None:
    """Copy the lakehouse, break its score tables, and run the score_tables checks through Dagster."""
    from msif_assets.build import build_definitions

    cfg, _, _, _ = run
    root = tmp_path / "lake"
    shutil.copytree(cfg.root / "tables", root / "tables")
    layout = Layout(root)
    create_database(layout)
    assert score_problems(layout) == {"finite": [], "rows": [], "duplicates": []}
    p = layout.scores("shard_00002")
    df = pd.read_parquet(p)
    df.loc[0, "score"] = np.nan  # a non-finite score
    q = df.query_id.iloc[-1]
    df = df[~((df.query_id == q) & (df.method == "gdp"))]  # a query loses its gdp rows in this shard
    df = pd.concat([df, df.iloc[[5]]])  # a duplicated row
    df.to_parquet(p, index=False)
    probs = score_problems(layout)
    assert probs["finite"] and probs["rows"] and probs["duplicates"]
    # the same through Dagster: the checks of score_tables fail
    bad_cfg = dataclasses.replace(cfg, root=root)
    defs = build_definitions(bad_cfg)
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.key.to_user_string() == "score_tables"]
    checks = [c for c in defs.asset_checks if {k.asset_key.to_user_string() for k in c.check_keys} == {"score_tables"}]
    result = dg.materialize(assets + checks, instance=dg.DagsterInstance.ephemeral(), resources=defs.resources,
                            raise_on_error=False)
    evals = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evals == {"scores_finite": False, "every_query_has_its_rows": False, "no_duplicate_rows": False,
                     "outputs_intact": True}  # a fresh instance has recorded no outputs to compare with


def test_definitions_module_and_cli(run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import importlib
    import sys

    from dagster_project import cli

    cfg, _, _, _ = run
    monkeypatch.setenv("MSIF_CONFIG", str(cfg.source))
    sys.modules.pop("dagster_project.definitions", None)
    mod = importlib.import_module("dagster_project.definitions")
    assert not isinstance(mod.defs, dg.Definitions)  # importing builds nothing: Dagster calls defs()
    defs = mod.defs()
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"pretrained_checkpoint", "pretraining_corpus", "influence_scores", "attribution_quality"} <= keys
    sensors = {s.name for s in defs.sensors}
    assert sensors == {"msif_source_sensor", "msif_automation"}
    # the human summary of `msif run`, on the lakehouse built above
    cli._print_summary(cfg, n_queries=2)
    out = capsys.readouterr().out
    assert "Top documents by ms_if" in out and "MRR" in out and "Recall@10" in out and "duckdb " in out
    # a configuration problem is reported before any work, with exit status 2
    bad = cfg.source.parent / "bad.toml"
    bad.write_text(cfg.source.read_text().replace("[factors]", "[factors]\nfisherr = 1"))
    assert cli.main(["run", str(bad)]) == 2
    assert "unknown key 'fisherr'" in capsys.readouterr().err
