"""The synthetic fact world: determinism, ground truth, train/test separation, validation, saving,
and the demo build (tiny size)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from msif_demo.build import DemoParams, build_demo
from msif_demo.relations import RELATIONS
from msif_demo.world import WorldParams, generate_world, qa_prompt, read_jsonl, save_world

SMALL = WorldParams(seed=3, n_entities=40, n_test_entities=8, relations=("born_in", "occupation", "colour"),
                    values_per_relation=5, n_filler_docs=10)


@pytest.fixture(scope="module")
def world():
    return generate_world(SMALL)


def _statements(relation: str, entity: str, value: str) -> list[str]:
    return [t.format(e=entity, v=value) for t in RELATIONS[relation].statements]


def test_deterministic_from_seed() -> None:
    a, b = generate_world(SMALL), generate_world(SMALL)
    assert a.documents == b.documents and a.queries == b.queries and a.finetune == b.finetune
    c = generate_world(dataclasses.replace(SMALL, seed=4))
    assert [d.text for d in c.documents] != [d.text for d in a.documents]
    assert c.entities != a.entities


def test_sizes_and_ids(world) -> None:
    p = SMALL
    assert len(world.entities) == len(set(world.entities)) == p.n_entities
    firsts = [e.split()[0] for e in world.entities]
    assert len(set(firsts)) == len(firsts), "first names must be unique"
    assert not set(firsts) & {e.split()[1] for e in world.entities}, "a first name is also a last name"
    assert len(world.test_entities) == p.n_test_entities
    assert len(world.queries) == p.n_test_entities * len(p.relations)
    assert len(world.finetune) == (p.n_entities - p.n_test_entities) * len(p.relations)
    ids = [d.doc_id for d in world.documents]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"d\d{6}", i) for i in ids)
    assert len({q.query_id for q in world.queries}) == len(world.queries)
    assert sum(1 for d in world.documents if not d.fact_ids) == p.n_filler_docs


def test_true_doc_ids_are_exactly_the_stating_documents(world) -> None:
    by_id = {d.doc_id: d for d in world.documents}
    for q in world.queries:
        answer = q.completion.strip()
        stated = _statements(q.relation, q.entity, answer)
        truth = {d.doc_id for d in world.documents if any(s in d.text for s in stated)}
        assert set(q.true_doc_ids) == truth
        assert SMALL.docs_per_fact_min <= len(q.true_doc_ids) <= SMALL.docs_per_fact_max
        for doc_id in q.true_doc_ids:
            text = by_id[doc_id].text
            assert q.entity in text and re.search(rf"\b{re.escape(answer)}\b", text)


def test_value_spans_point_at_values(world) -> None:
    n = 0
    for d in world.documents:
        assert {f for f, _, _ in d.value_spans} == set(d.fact_ids)
        for f, a, b in d.value_spans:
            assert d.text[a:b] == world.facts[f].value
            n += 1
    assert n == sum(len(d.fact_ids) for d in world.documents) > 0


def test_answers_are_hard_negatives(world) -> None:
    """An answer word also appears in documents that do not state the fact."""
    with_negatives = 0
    for q in world.queries:
        answer = q.completion.strip()
        others = [d for d in world.documents if d.doc_id not in q.true_doc_ids
                  and re.search(rf"\b{re.escape(answer)}\b", d.text)]
        with_negatives += bool(others)
    assert with_negatives == len(world.queries)


def test_test_entities_absent_from_finetune(world) -> None:
    test = set(world.test_entities)
    train = set(world.train_entities)
    assert not test & train and test | train == set(world.entities)
    blob = "\n".join(p.prompt + p.completion for p in world.finetune)
    for e in test:
        assert e not in blob
    expected = {qa_prompt(r, e) for e in train for r in SMALL.relations}
    assert {p.prompt for p in world.finetune} == expected
    # ... but their facts are in the pre-training corpus.
    corpus = "\n".join(d.text for d in world.documents)
    assert all(e in corpus for e in test)


def test_qa_format(world) -> None:
    for item in [*world.finetune, *world.queries]:
        assert item.prompt.startswith("Question: ") and item.prompt.endswith("?\nAnswer:")
        assert item.completion.startswith(" ") and len(item.completion.split()) == 1
    fact = {(f.entity, f.relation): f.value for f in world.facts}
    for q in world.queries:
        assert q.completion == " " + fact[(q.entity, q.relation)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_test_entities": 40}, "n_test_entities"),
        ({"n_test_entities": 0}, "n_test_entities"),
        ({"relations": ()}, "at least one relation"),
        ({"relations": ("born_in", "nope")}, "unknown relations"),
        ({"relations": ("born_in", "born_in")}, "distinct"),
        ({"values_per_relation": 1}, "values_per_relation"),
        ({"values_per_relation": 99}, "pool of relation"),
        ({"docs_per_fact_min": 0}, "docs_per_fact_min"),
        ({"docs_per_fact_min": 3, "docs_per_fact_max": 2}, "docs_per_fact_max"),
        ({"facts_per_doc": 0}, "facts_per_doc"),
        ({"filler_per_doc_min": 3, "filler_per_doc_max": 1}, "filler_per_doc"),
        ({"n_filler_docs": -1}, "n_filler_docs"),
        ({"n_entities": 10**7, "n_test_entities": 1}, "distinct names"),
        ({"alias_share": 1.5}, "alias_share"),
        ({"alias_share": 0.5, "alias_link_docs": 0}, "alias_link_docs"),
    ],
)
def test_validate_rejects_impossible_params(changes, message) -> None:
    bad = dataclasses.replace(SMALL, **changes)
    with pytest.raises(ValueError, match=message):
        bad.validate()
    with pytest.raises(ValueError):
        generate_world(bad)


def test_validate_accepts_defaults() -> None:
    WorldParams().validate()
    SMALL.validate()


def test_save_world_roundtrip(world, tmp_path: Path) -> None:
    paths = save_world(world, tmp_path / "data")
    table = pq.read_table(paths["corpus"])
    assert table.column_names == ["doc_id", "text"]
    assert table.column("doc_id").to_pylist() == [d.doc_id for d in world.documents]
    assert table.column("text").to_pylist() == [d.text for d in world.documents]
    ft = read_jsonl(paths["finetune"])
    assert ft[0].keys() == {"prompt", "completion"}
    assert [(r["prompt"], r["completion"]) for r in ft] == [(p.prompt, p.completion) for p in world.finetune]
    qs = read_jsonl(paths["queries"])
    assert {"query_id", "prompt", "completion", "true_doc_ids"} <= qs[0].keys()
    assert all(isinstance(r["true_doc_ids"], list) for r in qs)
    assert [r["true_doc_ids"] for r in qs] == [list(q.true_doc_ids) for q in world.queries]
    # the prompt's newline survives JSON
    assert qs[0]["prompt"] == world.queries[0].prompt and "\n" in qs[0]["prompt"]


def test_demo_params_presets_and_hash() -> None:
    demo, large = DemoParams(), DemoParams(size="large")
    assert large.world.n_entities > demo.world.n_entities
    assert large.model.hidden_size >= demo.model.hidden_size
    assert DemoParams().params_hash() == demo.params_hash()
    assert DemoParams(size="large").params_hash() != demo.params_hash()
    tweaked = DemoParams(world=dataclasses.replace(demo.world, seed=1))
    assert tweaked.params_hash() != demo.params_hash()
    assert tweaked.model == demo.model  # untouched parts keep the preset
    with pytest.raises(ValueError, match="unknown demo size"):
        DemoParams(size="huge")
    json.dumps(demo.to_dict())
    # the demo world is the advertised size
    w = demo.world
    w.validate()
    n_queries = w.n_test_entities * len(w.relations)
    assert 100 <= n_queries <= 300


def test_build_demo_tiny_writes_and_reuses(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = DemoParams(size="tiny", num_threads=1)
    out = tmp_path / "demo"
    (out / "keep.txt").parent.mkdir(parents=True)
    (out / "keep.txt").write_text("unrelated file")
    art = build_demo(out, params)
    assert not art.reused and art.complete()
    assert (out / "keep.txt").read_text() == "unrelated file"
    assert not [p for p in out.iterdir() if p.name.startswith(".build")]
    report = json.loads(art.report_path.read_text())
    assert report["params_hash"] == params.params_hash()
    for key in ("pretrained_test_qa", "finetuned_test_qa", "pretrained_test_cloze"):
        assert 0.0 <= report["accuracy"][key] <= 1.0
    assert report["proximity"] > 0
    assert set(report["timings"]) >= {"pretrain_s", "finetune_s", "total_s"}
    n_q = len(read_jsonl(art.queries_path))
    assert report["world"]["n_queries"] == n_q == len(read_jsonl(art.answers_path))
    model = AutoModelForCausalLM.from_pretrained(art.finetuned_dir)
    tok = AutoTokenizer.from_pretrained(art.finetuned_dir)
    assert model.config.vocab_size == len(tok) and tok.pad_token_id is not None

    mtime = (art.pretrained_dir / "model.safetensors").stat().st_mtime_ns
    again = build_demo(out, params)
    assert again.reused and again.report == report
    assert (art.pretrained_dir / "model.safetensors").stat().st_mtime_ns == mtime

    # a different parameter set rebuilds in place
    other = DemoParams(size="tiny", num_threads=1, world=dataclasses.replace(params.world, seed=9))
    rebuilt = build_demo(out, other)
    assert not rebuilt.reused and rebuilt.report["params_hash"] == other.params_hash() != params.params_hash()
    assert rebuilt.complete() and (out / "keep.txt").exists()


ALIASED = dataclasses.replace(SMALL, alias_share=0.5)


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def test_alias_world_states_facts_under_aliases_only() -> None:
    """alias_share = 0.5: half of the training and half of the test entities have an alias; their facts are
    stated only under it (no document stating an aliased fact contains a word of the real name), the link
    "<name> ... <alias>" is in alias_link_docs documents of its own, questions keep the real name, and the
    rest of the world is the one drawn without aliases."""
    plain, w = generate_world(SMALL), generate_world(ALIASED)
    assert len(w.aliases) == round(0.5 * 32) + round(0.5 * 8)
    assert sum(e in w.aliases for e in w.test_entities) == 4
    by_id = {d.doc_id: d for d in w.documents}
    names = {part for e in w.entities for part in _words(e)}
    for q in w.queries:
        answer = q.completion.strip()
        if not q.alias:
            assert q.entity not in w.aliases and not q.link_doc_ids
            continue
        assert q.alias == w.aliases[q.entity] and not _words(q.alias) & names  # no part of any real name
        assert q.prompt == qa_prompt(q.relation, q.entity)
        stated = _statements(q.relation, q.alias, answer)
        assert {d.doc_id for d in w.documents if any(s in d.text for s in stated)} == set(q.true_doc_ids)
        assert all(not _words(by_id[i].text) & _words(q.entity) for i in q.true_doc_ids)
        assert len(q.link_doc_ids) == ALIASED.alias_link_docs
        for i in q.link_doc_ids:
            assert q.entity in by_id[i].text and q.alias in by_id[i].text and not by_id[i].fact_ids
    mentions = {e: sum(e in d.text for d in w.documents) for e in w.aliases}
    assert all(n == ALIASED.alias_link_docs for n in mentions.values())  # the real name: in its links only
    assert len(w.documents) == len(plain.documents) + len(w.aliases) * ALIASED.alias_link_docs
    assert w.entities == plain.entities and set(w.finetune) == set(plain.finetune)
    assert sorted(d.text for d in w.documents if d.fact_ids and not any(a in d.text for a in w.aliases.values())) \
        == sorted(d.text for d in plain.documents
                  if d.fact_ids and not any(e in d.text for e in w.aliases))


def test_alias_queries_round_trip_and_plain_rows_are_unchanged(tmp_path: Path) -> None:
    save_world(generate_world(ALIASED), tmp_path / "a")
    save_world(generate_world(SMALL), tmp_path / "p")
    rows = read_jsonl(tmp_path / "a" / "queries.jsonl")
    assert {tuple(sorted(r)) for r in rows} == {
        ("completion", "entity", "prompt", "query_id", "relation", "true_doc_ids"),
        ("alias", "completion", "entity", "link_doc_ids", "prompt", "query_id", "relation", "true_doc_ids")}
    assert "alias" not in (tmp_path / "p" / "queries.jsonl").read_text()
    assert "alias_share" not in SMALL.to_dict() and ALIASED.to_dict()["alias_share"] == 0.5
