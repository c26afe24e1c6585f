"""The counterfactual test's parts (msif_demo/counterfactual.py) on a tiny demo world: retraining is
deterministic and reproduces the build, a removal takes exactly its documents out of pre-training, and a
configuration that cannot run is refused before any training."""

from __future__ import annotations

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM

from msif_demo.build import DemoParams, build_demo
from msif_demo.counterfactual import (
    CounterfactualError,
    DemoWorld,
    check_groups,
    choose_groups,
    measure,
    removal_sets,
    retrain,
    same_weights,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> DemoWorld:
    out = tmp_path_factory.mktemp("cf")
    build_demo(out, DemoParams(size="tiny", num_threads=1))
    return DemoWorld.load(out)


def test_retrain_is_deterministic_and_reproduces_the_build(world: DemoWorld) -> None:
    pre, ft, t = retrain(world)
    assert t["documents"] == len(world.corpus)
    shipped = AutoModelForCausalLM.from_pretrained(world.root / "models" / "pretrained")
    assert same_weights(pre, shipped)
    assert same_weights(ft, AutoModelForCausalLM.from_pretrained(world.root / "models" / "finetuned"))
    drop = world.corpus.doc_id.tolist()[:3]
    a, fa, ta = retrain(world, drop)
    b, fb, _ = retrain(world, drop)
    assert ta["documents"] == len(world.corpus) - 3
    assert same_weights(a, b) and same_weights(fa, fb)
    assert not same_weights(a, pre)  # the removal changed training
    m = measure(fa, world, world.queries.query_id.tolist()[:4])
    assert list(m.columns[:3]) == ["query_id", "nll", "correct"] and (m.nll > 0).all()
    with pytest.raises(CounterfactualError, match="unknown document"):
        retrain(world, ["no_such_doc"])


def test_groups_and_removal_sets(world: DemoWorld) -> None:
    q = world.queries
    groups = choose_groups(q, 2, 3, seed=1)
    assert groups == choose_groups(q, 2, 3, seed=1) and not set(groups[0]) & set(groups[1])
    by_id = q.set_index("query_id")
    for g in groups:
        true = [d for x in g for d in by_id.loc[x].true_doc_ids]
        assert len(true) == len(set(true))  # no shared source within a group
    docs = world.corpus.doc_id.tolist()
    ranking = {x: docs[i: i + 5] for i, x in enumerate(q.query_id)}
    plan = removal_sets({"m": ranking}, groups, [2], q, docs, seed=3)
    assert plan == removal_sets({"m": ranking}, groups, [2], q, docs, seed=3)  # random removals are seeded
    first = next(p for p in plan if p["group"] == 0 and p["method"] == "m")
    assert first["removed"] == sorted({d for x in groups[0] for d in ranking[x][:2]})
    oracle = next(p for p in plan if p["group"] == 1 and p["method"] == "true_sources")
    assert oracle["removed"] == sorted({d for x in groups[1] for d in by_id.loc[x].true_doc_ids})
    rnd = [p for p in plan if p["method"] == "random"]
    assert len(rnd) == 2 and all(0 < len(p["removed"]) <= 2 * 3 for p in rnd)
    assert not [p for p in plan if p["method"] == "alias_links"]  # no alias in this world
    aliased = q.assign(link_doc_ids=[[docs[i], docs[i + 1]] if i % 2 else float("nan") for i in range(len(q))])
    links = [p for p in removal_sets({"m": ranking}, groups, [2], aliased, docs) if p["method"] == "alias_links"]
    of = {x: v for x, v in zip(aliased.query_id, aliased.link_doc_ids, strict=True) if isinstance(v, list)}
    want = [sorted({d for x in g for d in of.get(x, [])}) for g in groups]
    assert [p["removed"] for p in links] == [w for w in want if w]


def test_configurations_that_cannot_run(world: DemoWorld) -> None:
    q, n = world.queries, len(world.corpus)
    ok = choose_groups(q, 1, 2)
    with pytest.raises(CounterfactualError, match=f"corpus of {n} documents"):
        check_groups(q, ok, [n], n)
    with pytest.raises(CounterfactualError, match="in an earlier group"):
        check_groups(q, [ok[0], ok[0][:1]], [1], n)
    by_id = q.set_index("query_id")
    same = q[q.duplicated(["entity"], keep=False)]
    a = same.iloc[0]
    twin = same[(same.entity == a.entity) & (same.query_id != a.query_id)].iloc[0]
    shared = pd.concat([q, pd.DataFrame([{**by_id.loc[twin.query_id].to_dict(), "query_id": "copy",
                                          "relation": "other"}])], ignore_index=True)
    with pytest.raises(CounterfactualError, match="share the true source"):
        check_groups(shared, [[twin.query_id, "copy"]], [1], n)
    with pytest.raises(CounterfactualError, match="only .* queries of group"):
        choose_groups(q, 1, len(q) + 1)
