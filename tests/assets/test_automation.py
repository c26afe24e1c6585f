"""Recompute only what changed, proven from the Dagster instance's event log:

- a new fine-tuned checkpoint recomputes the fine-tune factors, query iHVPs, scores and reports, and NOT
  the corpus shards, embeddings, candidates or pre-train factors;
- a new corpus shard computes that shard's documents, embeddings, candidates and scores (and the
  tables/reports over all shards), and nothing of the other shards, the factors or the iHVPs;
- a changed setting (code version) recomputes the assets that depend on it.

The changes are detected the way a deployment detects them: observing the sources (content hashes)
records new data versions, and ``dg.evaluate_automation_conditions`` decides what to request.
"""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest
from helpers.pipeline import build_world as _build_world
from helpers.pipeline import (
    corpus_rows,
    latest_storage_id,
    make_pipeline,
    materializations_since,
    perturb_checkpoint,
)

from msif_assets.layout import Layout
from msif_assets.sources import build_source_sensor

SHARDS = ["shard_00000", "shard_00001", "shard_00002"]
REPORTS = {("score_tables", None), ("attribution_report", None), ("attribution_quality", None)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("auto")
    toml = _build_world(root, n_docs=48, shard_size=16, candidates=6)  # three full shards
    cfg, defs, pipe = make_pipeline(toml)
    first = pipe.update()
    assert not first.failures and len(first.materialized) == 3 * 6 + 7
    return root, toml, cfg, defs, pipe


def test_sensor_observes_sources_and_adds_partitions(world) -> None:
    _, _, cfg, _, _ = world
    instance = dg.DagsterInstance.ephemeral()
    sensor = build_source_sensor(cfg)
    result = sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SensorResult)
    adds = [r for r in result.dynamic_partitions_requests if isinstance(r, dg.AddDynamicPartitionsRequest)]
    assert {(r.partitions_def_name, tuple(r.partition_keys)) for r in adds} == \
        {("corpus_shards", tuple(SHARDS)), ("pretrain_fit_shards", tuple(SHARDS))}
    observed = {(e.asset_key.to_user_string(), e.partition) for e in result.asset_events}
    assert observed == {("pretrained_checkpoint", None), ("finetuned_checkpoint", None), ("finetuning_data", None),
                        ("queries", None)} | {("pretraining_corpus", s) for s in SHARDS}
    assert all(e.tags.get("dagster/data_version", "").startswith("sha256:") for e in result.asset_events)


def test_new_finetuned_checkpoint(world) -> None:
    root, _, cfg, _, pipe = world
    layout = Layout(cfg.root)
    old_version = set(pd.read_parquet(layout.scores("shard_00000")).finetuned_version)
    mark = latest_storage_id(pipe.instance)
    perturb_checkpoint(root / "ckpt" / "pretrained", root / "ckpt" / "finetuned", seed=7)  # a new θ_ft

    sync = pipe.sync()
    assert sync.observed == ["finetuned_checkpoint"] and not sync.added_shards
    first_tick = pipe.evaluate()  # what the automation conditions request right after the observation
    # (eager also requests what can run in the same run after a requested upstream asset)
    assert first_tick == {(dg.AssetKey("finetune_factors"), None), (dg.AssetKey("query_ihvps"), None)}
    pipe.execute(first_tick)
    res = pipe.update()
    assert not res.failures

    done = materializations_since(pipe.instance, mark)
    expected = {("finetune_factors", None), ("query_ihvps", None)} | {("influence_scores", s) for s in SHARDS} \
        | REPORTS
    assert done == expected
    untouched = {"corpus_shards", "corpus_embeddings", "candidates", "pretrain_covariance_sums",
                 "pretrain_eigenbasis", "pretrain_lambda_sums", "pretrain_factors"}
    assert not {a for a, _ in done} & untouched
    new_version = set(pd.read_parquet(layout.scores("shard_00000")).finetuned_version)
    assert new_version != old_version and len(new_version) == 1
    assert pipe.update().runs == []  # and then it is settled


def test_new_corpus_shard(world) -> None:
    root, _, cfg, _, pipe = world
    mark = latest_storage_id(pipe.instance)
    rows = corpus_rows(60)  # 48 → 60 documents: shards 0-2 unchanged, a new shard_00003 of 12
    pd.DataFrame(rows).to_parquet(root / "data" / "corpus.parquet", index=False)

    sync = pipe.sync()
    assert sync.added_shards == ["shard_00003"]
    assert sync.observed == ["pretraining_corpus[shard_00003]"]  # the other shards' content hashes are unchanged
    assert not sync.fit_reset  # the pre-train factors keep their fit shards
    res = pipe.update()
    assert not res.failures

    done = materializations_since(pipe.instance, mark)
    new = "shard_00003"
    assert done == {(a, new) for a in ("corpus_shards", "corpus_embeddings", "candidates", "influence_scores")} \
        | REPORTS
    con_rows = pd.read_parquet(Layout(cfg.root).scores(new))
    assert set(con_rows.shard) == {new} and len(con_rows) == 6 * 6 * 6  # methods × queries × candidates
    assert pipe.update().runs == []


def test_changed_setting_recomputes_dependents(world) -> None:
    _, toml, _, _, pipe = world
    mark = latest_storage_id(pipe.instance)
    toml.write_text(toml.read_text().replace("damping_pretrain = 1e-3", "damping_pretrain = 1e-2"))
    cfg2, defs2, pipe2 = make_pipeline(toml, instance=pipe.instance)  # reload definitions: new code versions
    res = pipe2.update()
    assert not res.failures
    done = materializations_since(pipe.instance, mark)
    shards = pipe.instance.get_dynamic_partitions("corpus_shards")
    assert done == {("query_ihvps", None)} | {("influence_scores", s) for s in shards} | REPORTS
    ms = pd.read_parquet(Layout(cfg2.root).scores("shard_00000"))
    assert set(ms[ms.method == "ms_if"].damping_pretrain) == {"0.01"}
