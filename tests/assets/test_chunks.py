"""The memory plan in the pipeline: with a budget that forces several query chunks, query_ihvps writes one
folder per chunk and influence_scores scores each chunk's candidates only, giving the tables of a single
chunk; a chunk that fails leaves the chunks before it, and the next run resumes after them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers.pipeline import build_world, make_pipeline

from msif_assets.layout import Layout

METHODS = ("ms_if", "gdp", "bm25")


def _tables(root: Path) -> pd.DataFrame:
    df = pd.concat([pd.read_parquet(f) for f in sorted((root / "tables" / "influence_scores").glob("*.parquet"))])
    return df.sort_values(["query_id", "method", "doc_id"]).reset_index(drop=True)


def _memory_for_chunks(toml: Path, queries_per_chunk: int) -> float:
    """The memory_gib whose plan (as query_ihvps makes it, both models held) puts ``queries_per_chunk``
    queries in a chunk."""
    from msif_assets.assets.base import attribution_settings
    from msif_assets.config import load_config
    from msif_assets.io import read_records
    from msif_core.api import encode_queries, load_stages
    from msif_core.plan import budget_for, model_bytes, vocab_size

    cfg = load_config(toml)
    pt, ft = load_stages(cfg.pretrained, cfg.finetuned, attribution_settings(cfg))
    q = read_records(cfg.queries, "queries", ("prompt", "completion"))
    t = max(len(x) for x in encode_queries(ft, q.prompt.tolist(), q.completion.tolist(), 32).input_ids)
    return budget_for(ft.specs, queries_per_chunk, queries=len(q), rank=cfg.scores.query_rank, query_tokens=t,
                      dtype=next(ft.model.parameters()).dtype, doc_tokens=cfg.factors.max_length,
                      resident_bytes=model_bytes(pt.model, ft.model), batch_size=cfg.factors.batch_size,
                      vocab=vocab_size(pt.model))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("one_chunk")
    toml = build_world(root, n_docs=32, shard_size=16, candidates=5, methods=METHODS)
    _, _, pipe = make_pipeline(toml)
    assert not pipe.update().failures
    return root, _tables(root / "lakehouse")


def test_chunked_pipeline_gives_the_same_tables(single, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, want = single
    root = tmp_path / "w"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("lakehouse"))
    toml = root / "experiment.toml"
    gib = _memory_for_chunks(toml, 2)  # 6 queries → 3 chunks of 2
    toml.write_text(toml.read_text().replace("[scores]\n", f"[scores]\nmemory_gib = {gib!r}\n"))
    import msif_core.query

    real = msif_core.query.chunk_ihvps
    calls = []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("chunk 2 broke")
        return real(*a, **k)

    monkeypatch.setattr(msif_core.query, "chunk_ihvps", second_fails)
    _, _, pipe = make_pipeline(toml)
    res = pipe.update()
    assert [r.errors_in for r in res.failures] == [["query_ihvps"]] and "chunk 2 broke" in res.failures[0].error
    lay = Layout(root / "lakehouse")
    first = lay.ihvps("ms_if") / "chunk_00000"
    assert (first / ".done").exists() and not (lay.ihvps("ms_if") / "chunk_00001" / ".done").exists()
    stamp = (first / "ihvps.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(msif_core.query, "chunk_ihvps", real)
    calls.clear()
    res = pipe.update()
    assert not res.failures
    assert (first / "ihvps.safetensors").stat().st_mtime_ns == stamp  # resumed: chunk 0 was not recomputed
    ev = pipe.instance.get_latest_materialization_event(__import__("dagster").AssetKey("query_ihvps"))
    md = ev.asset_materialization.metadata
    assert md["plan/chunks"].value == 3 and md["resumed_chunks"].value == 1
    assert sorted(p.name for p in lay.ihvps("gdp").iterdir()) == ["chunk_00000", "chunk_00001", "chunk_00002"]
    ev = pipe.instance.get_latest_materialization_event(__import__("dagster").AssetKey("influence_scores"))
    assert ev.asset_materialization.metadata["passes/ms_if"].value == 3
    got = _tables(lay.root)
    pd.testing.assert_frame_equal(got.drop(columns=["score", "mlp_score", "mha_score"]),
                                  want.drop(columns=["score", "mlp_score", "mha_score"]))
    for col in ("score", "mlp_score", "mha_score"):  # float32 models: other chunks, other summation orders
        w = torch.tensor(want[col].to_numpy())
        torch.testing.assert_close(torch.tensor(got[col].to_numpy()), w, rtol=1e-5,
                                   atol=1e-5 * float(w[w.isfinite()].abs().max()), equal_nan=True)
