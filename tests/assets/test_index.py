"""The influence index in the pipeline (``[index] dimensions > 0``), from the tables and the event log:

- unprojected (dimensions above the number of analysed parameters) ``ms_if_index`` equals ``ms_if_cosine``
  (``[index] cosine``, the default; ‖φ‖ is then √self-influence) on every pair, and ``ms_if`` with
  ``cosine = false`` and float16 rows (every document a candidate, by ``candidates = "index"`` in index
  order), so the assets wire the index exactly;
- a new fine-tuned checkpoint recomputes ``query_vectors``, the candidates and the scores, never an
  ``influence_index`` partition;
- an index built for another projection is refused by name; a missing one names the fix.
"""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from helpers.pipeline import (
    build_world,
    corpus_rows,
    latest_storage_id,
    make_pipeline,
    materializations_since,
    perturb_checkpoint,
)

from msif_assets.checks import score_problems
from msif_assets.layout import Layout

SHARDS = ["shard_00000", "shard_00001"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("index")
    # candidates from the index: each query's top 16 of 16 (every document, ordered by index score)
    toml = build_world(root, n_docs=32, shard_size=16, candidates="index",
                       methods=("ms_if", "ms_if_cosine", "ms_if_unit", "bm25", "retriever"),
                       extra_toml='\n[index]\ndimensions = 1000000000\nkeep = 10\nrerank = 16\ndtype = "float32"\n')
    cfg, defs, pipe = make_pipeline(toml)
    first = pipe.update()
    assert not first.failures, first.failures
    return root, cfg, pipe


def test_unprojected_index_scores_equal_exact_ms_if(world) -> None:
    _, cfg, pipe = world
    layout = Layout(cfg.root)
    for shard in SHARDS:
        t = pd.read_parquet(layout.scores(shard))
        exact = t[t.method == "ms_if_cosine"].set_index(["query_id", "doc_id"])  # cosine: ms_if / ‖φ‖
        index = t[t.method == "ms_if_index"].set_index(["query_id", "doc_id"])
        assert len(exact) == 6 * 16 and len(index) == 6 * 10  # every document a candidate; the index keeps 10
        joined = index.join(exact, lsuffix="_index")
        assert (joined.shard_rank <= 10).all()  # the index's top 10 are the exact whitened cosine's top 10
        scale = np.abs(joined.score).max()
        assert np.abs(joined.score - joined.score_index).max() < 1e-4 * scale
        assert np.abs(joined.mlp_score - joined.mlp_score_index).max() < 1e-4 * scale
        assert (joined.shard_rank == joined.shard_rank_index).mean() > 0.95
        assert set(index.damping_pretrain) == set(exact.damping_pretrain)
    manifest = json.loads(layout.index_manifest(SHARDS[0]).read_text())
    assert manifest["documents"] == 16 and manifest["whiten"] is True
    cands = pd.read_parquet(layout.candidates(SHARDS[0]))
    assert len(cands) == 6 * 16 and cands.distance.notna().all()  # embedding distances (the retriever's)
    t = pd.read_parquet(layout.scores(SHARDS[0]))
    top = t[(t.method == "ms_if_index") & (t.shard_rank == 1)].set_index("query_id").doc_id
    first = cands[cands.neighbour_rank == 1].set_index("query_id").doc_id
    assert (first.reindex(top.index) == top).all()  # candidates in index order
    # the whitened cosine: MS-IF / √self-influence, the index's own exact sq_norm column an independent pass
    import lancedb

    idx = lancedb.connect(str(layout.lancedb)).open_table(layout.index_table(SHARDS[0])).to_pandas()
    si = pd.Series(idx.sq_norm.to_numpy(), index=idx.doc_id)
    ms = t[t.method == "ms_if"].set_index(["query_id", "doc_id"]).score
    cos = t[t.method == "ms_if_cosine"].set_index(["query_id", "doc_id"]).score.reindex(ms.index)
    want = ms / np.sqrt(si.reindex(ms.index.get_level_values("doc_id")).to_numpy())
    assert np.abs(cos - want).max() < 1e-4 * np.abs(want).max()
    stored = t[t.method == "ms_if_cosine"].set_index("doc_id").self_influence  # the column: the same pass's value
    assert np.allclose(stored.to_numpy(), si.reindex(stored.index).to_numpy(), rtol=1e-4)
    assert t[~t.method.isin(["ms_if_cosine", "ms_if_unit"])].self_influence.isna().all()
    unit = t[t.method == "ms_if_unit"].set_index(["query_id", "doc_id"]).score.reindex(ms.index)
    ratio = (ms / unit).groupby(level="doc_id")  # ‖∇ℓ(z)‖: one positive number per document
    assert (ratio.min() > 0).all() and np.allclose(ratio.min(), ratio.max(), rtol=1e-4)
    problems = score_problems(layout)  # the candidates checks do not count the index's own top documents
    assert not any(problems.values()), problems


def test_new_finetuned_checkpoint_rebuilds_no_index_partition(world) -> None:
    root, cfg, pipe = world
    mark = latest_storage_id(pipe.instance)
    perturb_checkpoint(root / "ckpt" / "pretrained", root / "ckpt" / "finetuned", seed=9)
    res = pipe.update()
    assert not res.failures
    done = {a for a, _ in materializations_since(pipe.instance, mark)}
    assert {"query_vectors", "candidates", "influence_scores"} <= done  # the index's top documents, rescored
    assert not done & {"influence_index", "corpus_shards", "corpus_embeddings", "pretrain_factors"}


def test_new_corpus_shard_builds_its_index_partition_and_search_only(world) -> None:
    """A new shard of the corpus: its documents, embeddings, index partition, candidates (its index search)
    and scores, and the tables over all shards; no other shard's partition, no factors, no query side."""
    root, cfg, pipe = world
    mark = latest_storage_id(pipe.instance)
    pd.DataFrame(corpus_rows(40)).to_parquet(root / "data" / "corpus.parquet", index=False)  # 32 → 40: a third shard
    sync = pipe.sync()
    assert sync.added_shards == ["shard_00002"] and not sync.fit_reset
    res = pipe.update()
    assert not res.failures, res.failures
    done = materializations_since(pipe.instance, mark)
    new = "shard_00002"
    assert done == {(a, new) for a in ("corpus_shards", "corpus_embeddings", "influence_index", "candidates",
                                       "influence_scores")} \
        | {("score_tables", None), ("attribution_report", None), ("attribution_quality", None)}
    t = pd.read_parquet(Layout(cfg.root).scores(new))
    assert len(t[t.method == "ms_if_index"]) == 6 * 8  # its 8 documents: fewer than keep = 10
    assert pipe.update().runs == []


def test_mismatched_or_missing_index_is_refused_by_name(world) -> None:
    _, cfg, pipe = world
    layout = Layout(cfg.root)
    path = layout.index_manifest(SHARDS[1])
    good = path.read_text()
    unit = [(dg.AssetKey("influence_scores"), SHARDS[1])]
    try:
        path.write_text(json.dumps(json.loads(good) | {"seed": 7}))
        (rec,) = pipe.execute(unit)
        assert not rec.success and "seed" in rec.error and str(path) in rec.error and "rematerialise" in rec.error
        path.unlink()
        (rec,) = pipe.execute(unit)
        assert not rec.success and "missing" in rec.error and "influence_index" in rec.error
    finally:
        path.write_text(good)
    (rec,) = pipe.execute(unit)
    assert rec.success


def _fp16_toml(cfg):
    """The shared world's experiment with float16 rows and the plain product, beside the first (the same
    relative paths)."""
    toml = cfg.source.with_name("experiment_fp16.toml")
    toml.write_text(cfg.source.read_text().replace('dtype = "float32"', 'dtype = "float16"\ncosine = false'))
    assert 'dtype = "float16"' in toml.read_text()
    return toml


def test_float16_plain_product_index_rebuilds_the_index_only_and_equals_ms_if(world) -> None:
    """``[index] dtype = "float16"``, ``cosine = false``: unit rows in half precision and their norms; a new
    code version of the index partitions (and of what reads them), never of the corpus or the query side;
    unprojected, the plain products equal exact MS-IF to half precision. After the tests that need the shared
    world's float32 index: it changes it."""
    import lancedb
    import pyarrow as pa

    root, cfg, pipe = world
    layout = Layout(cfg.root)
    before = pd.read_parquet(layout.scores(SHARDS[0]))
    toml = _fp16_toml(cfg)
    _, cfg16, pipe16 = make_pipeline(toml, instance=pipe.instance)
    mark = latest_storage_id(pipe.instance)
    res = pipe16.update()
    assert not res.failures, res.failures
    done = {a for a, _ in materializations_since(pipe.instance, mark)}
    assert {"influence_index", "influence_scores"} <= done
    assert not done & {"query_vectors", "query_ihvps", "corpus_shards", "pretrain_factors", "finetune_factors"}
    tbl = lancedb.connect(str(layout.lancedb)).open_table(layout.index_table(SHARDS[0])).to_arrow()
    assert tbl.schema.field("vector").type.value_type == pa.float16() and "norm" in tbl.column_names
    assert json.loads(layout.index_manifest(SHARDS[0]).read_text())["dtype"] == "float16"
    after = pd.read_parquet(layout.scores(SHARDS[0]))
    key = ["query_id", "doc_id"]
    new = after[after.method == "ms_if_index"].set_index(key)
    exact = after[after.method == "ms_if"].set_index(key).reindex(new.index)  # the plain product: MS-IF
    assert len(new) == 6 * 10 and (exact.shard_rank <= 11).mean() > 0.95  # its top 10, but for near ties
    assert np.abs(new.score - exact.score).max() < 2e-3 * np.abs(exact.score).max()
    assert np.abs(new.mlp_score - exact.mlp_score).max() < 2e-3 * np.abs(exact.score).max()
    old = before[before.method == "ms_if_index"].set_index(key).score  # the float32 cosine rows: other scores
    assert not np.allclose(old.to_numpy(), new.score.reindex(old.index).fillna(0).to_numpy())


def test_gdp_from_the_same_index_rebuilds_no_index_partition_and_equals_gdp(world) -> None:
    """``[index] gdp = true`` adds method ``gdp_index`` from the same document vectors: only the query side
    and the scores are recomputed, never an index partition or anything of the corpus or the factors;
    unprojected it equals exact ``gdp`` (the plain product even with ``[index] cosine``, which
    ``ms_if_index`` still uses), through float16 rows. Starts from the float16 experiment (brought up to date
    first, so this test also runs alone); ``gdp`` joins ``[scores] methods`` to compare with."""
    root, cfg, pipe = world
    layout = Layout(cfg.root)
    toml16 = _fp16_toml(cfg)
    _, _, pipe16 = make_pipeline(toml16, instance=pipe.instance)
    assert not pipe16.update().failures  # nothing to do after the float16 test
    toml = cfg.source.with_name("experiment_gdp.toml")
    toml.write_text(toml16.read_text().replace("cosine = false", "gdp = true")
                    .replace('"ms_if",', '"ms_if", "gdp",', 1))
    assert "gdp = true" in toml.read_text() and '"gdp"' in toml.read_text()
    _, cfg_gdp, pipe_gdp = make_pipeline(toml, instance=pipe.instance)
    mark = latest_storage_id(pipe.instance)
    res = pipe_gdp.update()
    assert not res.failures, res.failures
    done = {a for a, _ in materializations_since(pipe.instance, mark)}
    # query_ihvps: gdp joined [scores] methods; candidates: they are the index's top documents (rescored)
    assert done - {"query_ihvps", "candidates", "score_tables", "attribution_quality",
                   "attribution_report"} == {"query_vectors", "influence_scores"}
    meta = json.loads(layout.query_vectors.with_suffix(".json").read_text())
    assert meta["methods"] == ["ms_if", "gdp"] and layout.query_vectors_of("gdp").exists()
    t = pd.read_parquet(layout.scores(SHARDS[0]))
    key = ["query_id", "doc_id"]
    new = t[t.method == "gdp_index"].set_index(key)
    exact = t[t.method == "gdp"].set_index(key).reindex(new.index)
    assert len(new) == 6 * 10 and exact.score.notna().all()
    assert np.abs(new.score - exact.score).max() < 2e-3 * np.abs(exact.score).max()  # float16 rows
    assert (exact.shard_rank <= 11).mean() > 0.95  # gdp_index's top 10 are gdp's
    assert new.damping_pretrain.notna().all() and new.damping_finetune.isna().all()  # whitened: λ_pt enters
    ms = t[t.method == "ms_if_cosine"].set_index(key)
    msi = t[t.method == "ms_if_index"].set_index(key)
    assert np.abs(msi.score - ms.score.reindex(msi.index)).max() < 2e-3 * np.abs(ms.score).max()  # still cosine
    assert not any(score_problems(layout).values())
    # gdp off again: its vectors are removed, and stale ones are refused by name, never scored
    _, _, pipe16 = make_pipeline(toml16, instance=pipe.instance)
    assert not pipe16.update().failures
    assert not layout.query_vectors_of("gdp").exists()
    assert "gdp_index" not in set(pd.read_parquet(layout.scores(SHARDS[0])).method)
    np.save(layout.query_vectors_of("gdp"), np.zeros((6, 3), dtype=np.float32))  # left from another run
    try:
        (rec,) = pipe_gdp.execute([(dg.AssetKey("influence_scores"), SHARDS[0])])
        assert not rec.success and "lists no gdp query vectors" in rec.error and "query_vectors" in rec.error
    finally:
        layout.query_vectors_of("gdp").unlink()
