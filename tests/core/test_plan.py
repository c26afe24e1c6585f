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
from msif_core.plan import GIB, MemoryBudgetError, fixed_bytes, plan_memory, query_bytes
from msif_core.stages import Stage


def _budget_for(specs, queries_per_chunk: float, rank: int, q_tokens: int, d_tokens: int) -> float:
    """The memory_gib whose plan holds ``queries_per_chunk`` queries (room = 3/4 of the budget - fixed)."""
    per = query_bytes(specs, rank, q_tokens, 8)
    tokens = d_tokens * sum(s.out_features + s.d for s in specs) * 8 + fixed_bytes(specs, rank, 8, q_tokens)
    return (queries_per_chunk * per + tokens) / 0.75 / GIB


@pytest.mark.parametrize("rank", [0, 3])
def test_chunked_scores_equal_unchunked(rank: int) -> None:
    w = world("gpt_neox")
    stage = lambda m: Stage(LoadedModel(m, None, "", "causal_lm"), w.specs)  # noqa: E731
    pt, ft = stage(w.pt), stage(w.ft)
    queries = random_pairs(7, (2, 4), (1, 3), seed=61)
    qids, dids = [f"q{i}" for i in range(7)], [f"d{i}" for i in range(len(w.docs))]
    q_tokens, d_tokens = max(len(x) for x in queries.input_ids), max(len(x) for x in w.docs.input_ids)
    tables = {}
    for per_chunk in (100, 3.5, 1.2):
        gib = _budget_for(w.specs, per_chunk, rank, q_tokens, d_tokens)
        plan = plan_memory(w.specs, 7, rank, q_tokens, torch.float64, gib, "cpu", d_tokens)
        assert plan.chunks == {100: 1, 3.5: 3, 1.2: 7}[per_chunk] and plan.budget_bytes == int(gib * GIB)
        assert [list(r) for r in plan.ranges()] == [list(range(i, min(i + plan.queries_per_chunk, 7)))
                                                    for i in range(0, 7, plan.queries_per_chunk)]
        s = AttributionSettings(batch_size=3, damping_finetune=DAMP_FT, damping_pretrain=DAMP_PT, query_rank=rank,
                                memory_gib=gib)
        tables[per_chunk] = gradient_tables(pt, ft, queries, qids, w.docs, dids, s, w.pt_f, w.ft_f)
    for method in ("ms_if", "ss_if", "gdp"):
        one = tables[100][method]
        for k in (3.5, 1.2):
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


def test_rank_r_needs_far_less_per_query_at_realistic_shapes() -> None:
    """At Pythia-160M's shapes (hidden 768, 12 layers, per-head q/k/v blocks) a module-rank-32 query holds
    (P + d)·32 numbers per module: about 1/50 of an exact one, so a chunk holds ~50x more queries."""
    from msif_core.models import Block, ModuleSpec

    def spec(name, out, inp, heads=1):
        p = out // heads
        return ModuleSpec(name, "mlp", "linear", inp, out, True,
                          tuple(Block(f"{name}.{h}", name, "mlp", "x", h, h * p, (h + 1) * p) for h in range(heads)))

    specs = [s for i in range(12) for s in (spec(f"{i}.qkv", 3 * 768, 768, 36), spec(f"{i}.o", 768, 768),
                                            spec(f"{i}.up", 3072, 768), spec(f"{i}.down", 768, 3072))]
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
