"""The memory plan: a budget bounds the queries preconditioned and scored together; chunked scores equal
unchunked ones (float64, rank 0 and rank r); a budget too small for one query and one document is a clear
error naming the budget, the need and the fixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.core import random_pairs, rel_err
from helpers.scoring import DAMP_FT, DAMP_PT, world

from msif_core.api import AttributionSettings, gradient_tables
from msif_core.checkpoints import LoadedModel
from msif_core.plan import (
    BATCH_SHARE,
    GIB,
    PLANNED_SHARE,
    RUNTIME_BYTES,
    MemoryBudgetError,
    batch_bytes,
    budget_for,
    model_bytes,
    plan_memory,
    query_bytes,
    vocab_size,
)
from msif_core.stages import Stage


@pytest.mark.parametrize("rank", [0, 3])
def test_chunked_scores_equal_unchunked(rank: int) -> None:
    w = world("gpt_neox")
    stage = lambda m: Stage(LoadedModel(m, None, "", "causal_lm"), w.specs)  # noqa: E731
    pt, ft = stage(w.pt), stage(w.ft)
    queries = random_pairs(7, (2, 4), (1, 3), seed=61)
    qids, dids = [f"q{i}" for i in range(7)], [f"d{i}" for i in range(len(w.docs))]
    q_tokens, d_tokens = max(len(x) for x in queries.input_ids), max(len(x) for x in w.docs.input_ids)
    tables = {}
    for per_chunk in (100, 3, 1):
        held = model_bytes(w.pt, w.ft) + w.pt_f.resident_bytes() + w.ft_f.resident_bytes()  # as the API counts
        args = dict(queries=7, rank=rank, query_tokens=q_tokens, dtype=torch.float64, doc_tokens=d_tokens,
                    batch_size=3, resident_bytes=held, vocab=vocab_size(w.pt))
        gib = budget_for(w.specs, per_chunk, **args)
        plan = plan_memory(w.specs, memory_gib=gib, **args)
        assert plan.chunks == {100: 1, 3: 3, 1: 7}[per_chunk] and plan.budget_bytes == int(gib * GIB)
        assert [list(r) for r in plan.ranges()] == [list(range(i, min(i + plan.queries_per_chunk, 7)))
                                                    for i in range(0, 7, plan.queries_per_chunk)]
        s = AttributionSettings(batch_size=3, damping_finetune=DAMP_FT, damping_pretrain=DAMP_PT, query_rank=rank,
                                memory_gib=gib)
        stats: dict = {}
        tables[per_chunk] = gradient_tables(pt, ft, queries, qids, w.docs, dids, s, w.pt_f, w.ft_f, stats=stats)
        assert stats["plan"]["chunks"] == plan.chunks
    for method in ("ms_if", "ss_if", "gdp"):
        one = tables[100][method]
        for k in (3, 1):
            other = tables[k][method]
            assert list(other.query_id) == list(one.query_id) and list(other.doc_id) == list(one.doc_id)
            for col in ("score", "mlp_score", "mha_score"):
                assert rel_err(other[col].to_numpy(), one[col].to_numpy()) < 1e-12, (method, k, col)
            np.testing.assert_array_equal(other["rank"].to_numpy(), one["rank"].to_numpy())


def test_budget_too_small_is_a_clear_error() -> None:
    w = world("gpt_neox")
    with pytest.raises(MemoryBudgetError) as e:
        plan_memory(w.specs, 5, 0, 8, torch.float32, memory_gib=1e-6)
    msg = str(e.value)
    for words in ("memory budget of 0.00 GiB", "one query needs", "raise memory_gib", "query_rank", '"mlp"'):
        assert words in msg, (words, msg)
    with pytest.raises(ValueError, match="memory_gib must be > 0"):
        plan_memory(w.specs, 5, memory_gib=0)


def _pythia_160m_specs():
    """Module specs of Pythia-160M's shapes (hidden 768, 12 layers, per-head q/k/v blocks), built by hand."""
    from msif_core.models import Block, ModuleSpec

    def spec(name, out, inp, heads=1):
        p = out // heads
        return ModuleSpec(name, "mlp", "linear", inp, out, True,
                          tuple(Block(f"{name}.{h}", name, "mlp", "x", h, h * p, (h + 1) * p) for h in range(heads)))

    return [s for i in range(12) for s in (spec(f"{i}.qkv", 3 * 768, 768, 36), spec(f"{i}.o", 768, 768),
                                           spec(f"{i}.up", 3072, 768), spec(f"{i}.down", 768, 3072))]


def test_rank_r_needs_far_less_per_query_at_realistic_shapes() -> None:
    """At Pythia-160M's shapes a module-rank-32 query holds (P + d)·32 numbers per module: about 1/50 of an
    exact one, so a chunk holds ~50x more queries."""
    specs = _pythia_160m_specs()
    exact, low = query_bytes(specs, 0, 32, 4), query_bytes(specs, 32, 32, 4)
    assert 20 < exact / low < 60
    plan = plan_memory(specs, 200, 32, 32, torch.float32, memory_gib=8, doc_tokens=256)
    assert plan.chunks == 1
    assert plan_memory(specs, 200, 0, 32, torch.float32, memory_gib=8, doc_tokens=256).chunks > 10


def test_factors_read_in_float32_score_as_float64_ones(tmp_path) -> None:
    """Factors stored in float64 and read as float32 (half the memory; a float32 model preconditions in
    float32 anyway) change MS-IF scores by no more than float32 rounding."""
    from helpers.core import PAD

    from msif_core.ekfac import Factors
    from msif_core.query import measurement_gradients, query_ihvps
    from msif_core.scoring import score_documents

    w = world("gpt_neox")
    w.pt_f.save(tmp_path / "pt")
    w.ft_f.save(tmp_path / "ft")
    f32 = {s: Factors.load(tmp_path / s, dtype=torch.float32) for s in ("pt", "ft")}
    assert all(t.dtype == torch.float32 for t in f32["pt"].q_a.values())
    grads = measurement_gradients(w.ft, w.specs, w.queries, pad_id=PAD)
    scores = {}
    for key, (ptf, ftf) in {"64": (w.pt_f, w.ft_f), "32": (f32["pt"], f32["ft"])}.items():
        ih = query_ihvps(grads, w.specs, "ms_if", ftf, ptf, DAMP_FT, DAMP_PT)
        scores[key] = score_documents(w.pt, ih, w.docs, batch_size=3, pad_id=PAD).scores
    assert 0 < rel_err(scores["32"], scores["64"]) < 1e-5


def test_plan_counts_the_whole_process() -> None:
    """The budget is the process's: the models the caller holds and the runtime come off it, a document
    batch too large for its share is halved, and what is left (less the larger phase's temporaries) is
    what the chunk's iHVPs get."""
    specs = _pythia_160m_specs()
    args = dict(queries=200, rank=0, query_tokens=32, dtype=torch.float32, memory_gib=8, doc_tokens=256,
                batch_size=8, vocab=50304)
    free, held = plan_memory(specs, **args), plan_memory(specs, resident_bytes=2 * GIB, **args)
    assert free.resident_bytes == RUNTIME_BYTES and held.resident_bytes == RUNTIME_BYTES + 2 * GIB
    per = free.bytes_per_query
    assert free.queries_per_chunk - held.queries_per_chunk in (2 * GIB // per, 2 * GIB // per + 1)
    one = batch_bytes(specs, 256, torch.float32, 50304)
    assert 1 <= free.batch_size < 8
    assert free.batch_size * one <= BATCH_SHARE * free.budget_bytes < 2 * free.batch_size * one
    total = free.resident_bytes + free.fixed_bytes + free.queries_per_chunk * per
    planned = int(PLANNED_SHARE * free.budget_bytes)
    assert total <= planned < total + per  # as many queries as fit, and no more
    assert plan_memory(specs, **(args | {"memory_gib": 64})).batch_size == 8  # room for the configured batch
    with pytest.raises(MemoryBudgetError, match="GiB of runtime and models"):
        plan_memory(specs, resident_bytes=8 * GIB, **args)


def test_lazy_factors_score_as_loaded_ones_reading_module_by_module(tmp_path) -> None:
    """Factors read lazily give the same iHVPs bit for bit, hold no module beyond the last two read, and a
    file altered after loading is named when next read."""
    from helpers.core import PAD

    from msif_core.ekfac import Factors, LazyTensors, UnreadableFileError
    from msif_core.query import measurement_gradients, query_ihvps

    w = world("gpt_neox")
    w.pt_f.save(tmp_path / "pt")
    w.ft_f.save(tmp_path / "ft")
    eager = [Factors.load(tmp_path / s) for s in ("ft", "pt")]
    lazy = [Factors.load(tmp_path / s, lazy=True) for s in ("ft", "pt")]
    assert all(isinstance(f.q_s, LazyTensors) and f.resident_bytes() == 0 for f in lazy)
    assert eager[0].resident_bytes() == 8 * eager[0].n_floats() == 8 * lazy[0].n_floats()
    grads = measurement_gradients(w.ft, w.specs, w.queries, pad_id=PAD)
    for rank in (0, 2):
        want = query_ihvps(grads, w.specs, "ms_if", *eager, DAMP_FT, DAMP_PT, rank)
        got = query_ihvps(grads, w.specs, "ms_if", *lazy, DAMP_FT, DAMP_PT, rank)
        for kind in ("dense", "u", "v"):
            for name, x in getattr(want, kind).items():
                torch.testing.assert_close(getattr(got, kind)[name], x, rtol=0, atol=0)
    assert all(len(getattr(f, k)._recent) <= 2 for f in lazy for k in ("q_a", "q_s", "lam"))
    moved = lazy[1].to("cpu")
    assert isinstance(moved.lam, LazyTensors)
    path = tmp_path / "pt" / "factors.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UnreadableFileError, match="pt/factors.safetensors"):
        moved.lam[w.names[0]]


def test_the_fit_cache_stays_within_the_memory_budget():
    """With memory_gib the fit's pass cache is a quarter of it (it was a quarter of the machine's memory:
    a Pythia-160M fit then peaked at 12.8 GiB under an 8 GiB budget, bench/results/kronfluence.jsonl)."""
    from msif_core.api import AttributionSettings

    assert AttributionSettings(memory_gib=8).fit_settings().cache_mib == 2048
    assert AttributionSettings().fit_settings().cache_mib is None
