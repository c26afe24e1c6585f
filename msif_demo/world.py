"""Synthetic fact world for the fact-tracing demo (paper section 5.3, SPEC section 6).

The world is a set of invented entities (unique syllable names such as "Zorbin Kel"), each with one
value per relation (birthplace, occupation, favourite colour, ...).  Object values come from SMALL
shared pools, so an answer word appears in many documents that do not state the fact (hard negatives).

Three data sets are derived from it, all deterministic functions of :class:`WorldParams`:

- the pre-training corpus: documents ``d000000, d000001, ...``; every fact (of every entity) is stated
  in ``docs_per_fact_min..docs_per_fact_max`` documents with varied templates, each document mixing a
  few facts (usually of one main entity plus other entities) with filler sentences, plus some
  filler-only documents;
- the fine-tuning data: instruction-style QA pairs (prompt, completion) for the facts of TRAINING
  entities, e.g. ``"Question: Where was Zorbin Kel born?\\nAnswer:"`` -> ``" Velmora"``;
- the held-out queries: the same QA form for TEST entities, whose facts appear only in pre-training,
  with ``true_doc_ids`` = every pre-training document that states the fact.

:func:`msif_demo.build.build_demo` additionally trains the two tiny models (see :mod:`msif_core.training`) and writes
everything under one directory, skipping the work when an identical build is already there.

Token convention shared with :mod:`msif_core.training`: a document is the sequence
``tokenizer(text)["input_ids"]`` (no special tokens are added), a query/QA pair is
``tokenizer(prompt) + tokenizer(completion)`` with the completion's leading space kept.

Why one file of ~430 lines: the parameters, the records, the generator and the writers are one
pure function of :class:`WorldParams` and its output format; the relation data is in :mod:`.relations`.
"""


from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .relations import (
    ALIAS_TEMPLATES,
    ANSWER_SUFFIX,
    FILLER_TEMPLATES,
    FILLER_WORDS,
    QUESTION_PREFIX,
    RELATIONS,
    SYLLABLES,
)

# ---------------------------------------------------------------------------------------------------
# Parameters and records
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldParams:
    """Size and shape of the synthetic world.  Every field is plain data; the world is a pure function
    of these fields.

    Attributes:
        seed: seed of the world's random generator (names, facts, templates, document grouping).
        n_entities: number of invented entities (training + test).
        n_test_entities: how many of them are held out: their facts appear only in pre-training and
            become the test queries (``n_test_entities * len(relations)`` queries).
        relations: relation names, a subset of :data:`RELATIONS` (order matters for generation).
        values_per_relation: size of each relation's value pool (the first values of its list);
            small pools make answer words frequent (hard negatives).  At least 2, at most the pool.
        docs_per_fact_min, docs_per_fact_max: each fact is stated in this many documents (uniform).
        facts_per_doc: fact statements per fact-bearing document (the last document may hold fewer).
        main_entity_facts: at most this many of a document's statements are about its main entity;
            the other statements are about other entities.
        filler_per_doc_min, filler_per_doc_max: filler sentences added to each fact-bearing document.
        n_filler_docs: extra documents made of filler only.
        filler_per_filler_doc: filler sentences in each filler-only document.
        alias_share: share of the entities (the same share of training and of test entities) whose facts
            the corpus states only under an alias, a second invented name; the link "<name> is also
            known as <alias>." is stated in documents of its own, and questions keep the real name. A
            question then shares no rare word with the documents that state its answer (lexical and
            embedding retrieval find the link documents instead). 0 = no alias (the world is unchanged).
        alias_link_docs: documents stating each alias link (each with one or two filler sentences).
    """

    seed: int = 0
    n_entities: int = 250
    n_test_entities: int = 60
    relations: tuple[str, ...] = ("born_in", "occupation", "colour", "language", "instrument")
    values_per_relation: int = 10
    docs_per_fact_min: int = 3
    docs_per_fact_max: int = 5
    facts_per_doc: int = 3
    main_entity_facts: int = 2
    filler_per_doc_min: int = 0
    filler_per_doc_max: int = 2
    n_filler_docs: int = 150
    filler_per_filler_doc: int = 4
    alias_share: float = 0.0
    alias_link_docs: int = 3

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field when the parameters are impossible."""
        errors: list[str] = []
        if not isinstance(self.seed, int):
            errors.append(f"seed must be an int, got {self.seed!r}")
        if self.n_entities < 2:
            errors.append(f"n_entities must be >= 2 (one training and one test entity), got {self.n_entities}")
        if self.n_test_entities < 1:
            errors.append(f"n_test_entities must be >= 1, got {self.n_test_entities}")
        elif self.n_test_entities >= self.n_entities:
            errors.append(
                f"n_test_entities ({self.n_test_entities}) must be smaller than n_entities "
                f"({self.n_entities}): at least one training entity is needed for fine-tuning"
            )
        if len(self.relations) == 0:
            errors.append("relations must name at least one relation")
        unknown = [r for r in self.relations if r not in RELATIONS]
        if unknown:
            errors.append(f"unknown relations {unknown}; known: {sorted(RELATIONS)}")
        if len(set(self.relations)) != len(self.relations):
            errors.append(f"relations must be distinct, got {list(self.relations)}")
        if self.values_per_relation < 2:
            errors.append(f"values_per_relation must be >= 2, got {self.values_per_relation}")
        for r in self.relations:
            if r in RELATIONS and self.values_per_relation > len(RELATIONS[r].values):
                errors.append(
                    f"values_per_relation={self.values_per_relation} but the pool of relation {r!r} "
                    f"holds only {len(RELATIONS[r].values)} values"
                )
        if self.docs_per_fact_min < 1:
            errors.append(f"docs_per_fact_min must be >= 1, got {self.docs_per_fact_min}")
        if self.docs_per_fact_max < self.docs_per_fact_min:
            errors.append(
                f"docs_per_fact_max ({self.docs_per_fact_max}) must be >= docs_per_fact_min "
                f"({self.docs_per_fact_min})"
            )
        if self.facts_per_doc < 1:
            errors.append(f"facts_per_doc must be >= 1, got {self.facts_per_doc}")
        if self.main_entity_facts < 1:
            errors.append(f"main_entity_facts must be >= 1, got {self.main_entity_facts}")
        if self.filler_per_doc_min < 0 or self.filler_per_doc_max < self.filler_per_doc_min:
            errors.append(
                f"need 0 <= filler_per_doc_min <= filler_per_doc_max, got "
                f"{self.filler_per_doc_min}, {self.filler_per_doc_max}"
            )
        if self.n_filler_docs < 0:
            errors.append(f"n_filler_docs must be >= 0, got {self.n_filler_docs}")
        if self.n_filler_docs > 0 and self.filler_per_filler_doc < 1:
            errors.append(f"filler_per_filler_doc must be >= 1, got {self.filler_per_filler_doc}")
        if not 0.0 <= self.alias_share <= 1.0:
            errors.append(f"alias_share must be within [0, 1], got {self.alias_share}")
        if self.alias_share > 0 and self.alias_link_docs < 1:
            errors.append(f"alias_link_docs must be >= 1 when alias_share > 0, got {self.alias_link_docs}")
        if self.n_entities * (2 if self.alias_share > 0 else 1) > max_entities():
            errors.append(f"n_entities={self.n_entities} and their aliases exceed the {max_entities()} distinct "
                          "names available")
        if self.n_entities > max_entities():
            errors.append(f"n_entities={self.n_entities} exceeds the {max_entities()} distinct names available")
        if errors:
            raise ValueError("invalid WorldParams: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        d = dataclasses.asdict(self)
        d["relations"] = list(self.relations)
        if self.alias_share == 0:  # the fields of a world without aliases, as before they existed
            d.pop("alias_share")
            d.pop("alias_link_docs")
        return d


@dataclass(frozen=True)
class Fact:
    """(entity, relation, value) triple; ``test`` marks facts of held-out entities."""

    entity: str
    relation: str
    value: str
    test: bool


@dataclass(frozen=True)
class Document:
    """A pre-training document with the facts it states (indices into ``World.facts``) and, for each,
    the character span ``(fact_id, start, end)`` of the stated value in ``text``."""

    doc_id: str
    text: str
    fact_ids: tuple[int, ...]
    value_spans: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class QAPair:
    """A fine-tuning example: the model sees ``prompt`` and learns ``completion`` (loss on it only)."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Query:
    """A held-out test question with its ground-truth source documents."""

    query_id: str
    prompt: str
    completion: str
    true_doc_ids: tuple[str, ...]
    entity: str
    relation: str
    alias: str = ""  # the name the corpus states the facts under ("" = the entity's own)
    link_doc_ids: tuple[str, ...] = ()  # the documents stating "<entity> is also known as <alias>"


@dataclass
class World:
    """The generated world: facts, corpus, fine-tuning pairs and held-out queries."""

    params: WorldParams
    entities: list[str]
    test_entities: list[str]
    facts: list[Fact]
    documents: list[Document]
    finetune: list[QAPair]
    queries: list[Query]
    cloze: list[QAPair] = field(default_factory=list)  # statement-form prompts of the test facts
    aliases: dict[str, str] = field(default_factory=dict)  # entity -> the name its facts are stated under

    @property
    def train_entities(self) -> list[str]:
        """Entities whose facts are in the fine-tuning data."""
        held = set(self.test_entities)
        return [e for e in self.entities if e not in held]


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------


def max_entities() -> int:
    """How many distinct entity names the generator can produce (first names are unique)."""
    n = len(SYLLABLES)
    return (n * n) // 2 + (n * n * n) // 2  # half of the 2- and 3-syllable first names, so sampling stays fast


def qa_prompt(relation: str, entity: str) -> str:
    """The instruction-style QA prompt for (entity, relation)."""
    return f"{QUESTION_PREFIX}{RELATIONS[relation].question.format(e=entity)}{ANSWER_SUFFIX}"


def _make_names(rng: random.Random, n: int, taken: Sequence[str] = ()) -> list[str]:
    """``n`` unique names "First Last".  First names (2-3 syllables) are unique across entities and
    never used as a last name; no name part is a pool value, a filler word or a part of a name in
    ``taken``."""
    reserved = {v.lower() for spec in RELATIONS.values() for v in spec.values}
    reserved |= {w for words in FILLER_WORDS.values() for w in words}
    taken_parts = [name.lower().split() for name in taken]
    firsts: set[str] = {p[0] for p in taken_parts}
    lasts: set[str] = {p[-1] for p in taken_parts}
    taken_lasts = set(lasts)  # a last name may repeat among new names, never one of a taken name
    names: list[str] = []
    # Prefer 2-syllable first names; switch to 3 syllables once half of them are taken.
    two_cap = len(SYLLABLES) ** 2
    while len(names) < n:
        k = 2 if len(firsts) < two_cap // 2 else 3
        first = "".join(rng.choice(SYLLABLES) for _ in range(k))
        if first in firsts or first in lasts or first in reserved:
            continue
        last = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2))))
        if last in reserved or last in firsts or last == first or last in taken_lasts:
            continue
        firsts.add(first)
        lasts.add(last)
        names.append(f"{first.capitalize()} {last.capitalize()}")
    return names


def _filler_sentence(rng: random.Random, p: WorldParams) -> str:
    template = rng.choice(FILLER_TEMPLATES)
    slots: dict[str, str] = {k: rng.choice(v) for k, v in FILLER_WORDS.items()}
    pool_slot = {"city": "born_in", "colour": "colour", "instrument": "instrument", "occupation": "occupation",
                 "pet": "pet", "language": "language"}
    for slot, rel in pool_slot.items():
        slots[slot] = rng.choice(RELATIONS[rel].values[: max(p.values_per_relation, 2)])
    return template.format(**slots)


def generate_world(params: WorldParams) -> World:
    """Generate the world deterministically from ``params`` (validated first)."""
    params.validate()
    rng = random.Random(params.seed)
    entities = _make_names(rng, params.n_entities)
    test_entities = sorted(rng.sample(entities, params.n_test_entities), key=entities.index)
    test_set = set(test_entities)
    aliases, alias_rng = _choose_aliases(params, entities, test_entities)
    named = lambda e: aliases.get(e, e)  # noqa: E731 - the name the corpus states e's facts under

    facts: list[Fact] = []
    facts_of: dict[str, list[int]] = {}
    for e in entities:
        for r in params.relations:
            value = rng.choice(RELATIONS[r].values[: params.values_per_relation])
            facts_of.setdefault(e, []).append(len(facts))
            facts.append(Fact(e, r, value, e in test_set))

    # Pending statements: fact id -> how many more documents must state it.
    pending: dict[str, dict[int, int]] = {}
    for e in entities:
        pending[e] = {
            f: rng.randint(params.docs_per_fact_min, params.docs_per_fact_max) for f in facts_of[e]
        }
    active = list(entities)  # entities that may still have pending statements (pruned lazily)

    def pick() -> str | None:
        """A uniformly random entity with pending statements, or None when all are stated."""
        while active:
            i = rng.randrange(len(active))
            if pending[active[i]]:
                return active[i]
            active[i] = active[-1]
            active.pop()
        return None

    def take(entity: str, exclude: set[int], k: int) -> list[int]:
        options = [f for f, c in pending[entity].items() if c > 0 and f not in exclude]
        chosen = rng.sample(options, min(k, len(options)))
        for f in chosen:
            pending[entity][f] -= 1
            if pending[entity][f] == 0:
                del pending[entity][f]
        return chosen

    groups: list[list[int]] = []
    while (main := pick()) is not None:
        doc_facts = take(main, set(), rng.randint(1, min(params.main_entity_facts, params.facts_per_doc)))
        tries = 0
        while len(doc_facts) < params.facts_per_doc and tries < 20:
            tries += 1
            other = pick()
            if other is None:
                break
            if other == main and len(active) > 1:
                continue
            doc_facts += take(other, set(doc_facts), 1)
        groups.append(doc_facts)

    raw_docs: list[tuple[str, tuple[int, ...], tuple[tuple[int, int, int], ...]]] = []
    for doc_facts in groups:
        # (sentence, fact id or -1 for filler, offset of the value inside the sentence)
        sentences: list[tuple[str, int, int]] = []
        for f in doc_facts:
            fact = facts[f]
            template = rng.choice(RELATIONS[fact.relation].statements)
            prefix = template.split("{v}")[0].format(e=named(fact.entity))
            sentences.append((template.format(e=named(fact.entity), v=fact.value), f, len(prefix)))
        n_fill = rng.randint(params.filler_per_doc_min, params.filler_per_doc_max)
        sentences += [(_filler_sentence(rng, params), -1, 0) for _ in range(n_fill)]
        rng.shuffle(sentences)
        pos, spans = 0, []
        for sent, f, off in sentences:
            if f >= 0:
                spans.append((f, pos + off, pos + off + len(facts[f].value)))
            pos += len(sent) + 1
        text = " ".join(s for s, _, _ in sentences)
        raw_docs.append((text, tuple(sorted(doc_facts)), tuple(sorted(spans))))
    for _ in range(params.n_filler_docs):
        text = " ".join(_filler_sentence(rng, params) for _ in range(params.filler_per_filler_doc))
        raw_docs.append((text, (), ()))
    link_texts = {e: [_link_text(alias_rng, params, e, a) for _ in range(params.alias_link_docs)]
                  for e, a in aliases.items()}
    raw_docs += [(text, (), ()) for texts in link_texts.values() for text in texts]
    rng.shuffle(raw_docs)
    width = max(6, len(str(len(raw_docs))))
    documents = [Document(f"d{i:0{width}d}", text, fids, spans) for i, (text, fids, spans) in enumerate(raw_docs)]

    link_of_text = {text: e for e, texts in link_texts.items() for text in texts}
    links: dict[str, list[str]] = {}
    for doc in documents:
        if doc.text in link_of_text:
            links.setdefault(link_of_text[doc.text], []).append(doc.doc_id)
    sources: dict[int, list[str]] = {}
    for doc in documents:
        for f in doc.fact_ids:
            sources.setdefault(f, []).append(doc.doc_id)

    finetune: list[QAPair] = []
    queries: list[Query] = []
    cloze: list[QAPair] = []
    for fid, fact in enumerate(facts):
        prompt = qa_prompt(fact.relation, fact.entity)
        completion = " " + fact.value
        if fact.test:
            queries.append(
                Query(
                    query_id=f"q{len(queries):05d}",
                    prompt=prompt,
                    completion=completion,
                    true_doc_ids=tuple(sources[fid]),
                    entity=fact.entity,
                    relation=fact.relation,
                    alias=aliases.get(fact.entity, ""),
                    link_doc_ids=tuple(links.get(fact.entity, ())),
                )
            )
            cloze.append(QAPair(RELATIONS[fact.relation].cloze.format(e=fact.entity), completion))
        else:
            finetune.append(QAPair(prompt, completion))
    rng.shuffle(finetune)
    return World(params, entities, test_entities, facts, documents, finetune, queries, cloze, aliases)


def _choose_aliases(params: WorldParams, entities: list[str],
                    test_entities: list[str]) -> tuple[dict[str, str], random.Random]:
    """The aliased entities (``alias_share`` of the training and of the test entities) and their aliases,
    drawn from a generator of their own so that the rest of the world is drawn as without aliases."""
    rng = random.Random(f"{params.seed}:aliases")
    if params.alias_share == 0:
        return {}, rng
    held = set(test_entities)
    train = [e for e in entities if e not in held]
    chosen = [e for group in (train, test_entities)
              for e in rng.sample(group, round(params.alias_share * len(group)))]
    chosen.sort(key=entities.index)
    return dict(zip(chosen, _make_names(rng, len(chosen), taken=entities), strict=True)), rng


def _link_text(rng: random.Random, params: WorldParams, entity: str, alias: str) -> str:
    """A document stating that ``entity`` is also known as ``alias``, among one or two filler sentences."""
    sentences = [rng.choice(ALIAS_TEMPLATES).format(e=entity, a=alias)]
    sentences += [_filler_sentence(rng, params) for _ in range(rng.randint(1, 2))]
    rng.shuffle(sentences)
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------


def save_corpus_parquet(documents: Sequence[Document], path: Path) -> None:
    """Write the corpus as Parquet with columns ``doc_id`` (string) and ``text`` (string)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {"doc_id": pa.array([d.doc_id for d in documents], pa.string()),
         "text": pa.array([d.text for d in documents], pa.string())}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """One JSON object per line (UTF-8), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def save_finetune_jsonl(pairs: Sequence[QAPair], path: Path) -> None:
    """Write fine-tuning pairs as JSONL rows ``{"prompt", "completion"}``."""
    write_jsonl(({"prompt": p.prompt, "completion": p.completion} for p in pairs), path)


def save_queries_jsonl(queries: Sequence[Query], path: Path) -> None:
    """Write queries as JSONL rows ``{"query_id", "prompt", "completion", "true_doc_ids", "entity",
    "relation"}`` (``true_doc_ids`` is a list of doc ids), plus ``alias`` and ``link_doc_ids`` for the
    queries about an aliased entity."""
    write_jsonl(
        (
            {"query_id": q.query_id, "prompt": q.prompt, "completion": q.completion,
             "true_doc_ids": list(q.true_doc_ids), "entity": q.entity, "relation": q.relation,
             **({"alias": q.alias, "link_doc_ids": list(q.link_doc_ids)} if q.alias else {})}
            for q in queries
        ),
        path,
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file into a list of dicts."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def save_world(world: World, data_dir: Path) -> dict[str, Path]:
    """Write ``corpus.parquet``, ``finetune.jsonl`` and ``queries.jsonl`` into ``data_dir``."""
    paths = {
        "corpus": data_dir / "corpus.parquet",
        "finetune": data_dir / "finetune.jsonl",
        "queries": data_dir / "queries.jsonl",
    }
    save_corpus_parquet(world.documents, paths["corpus"])
    save_finetune_jsonl(world.finetune, paths["finetune"])
    save_queries_jsonl(world.queries, paths["queries"])
    return paths


