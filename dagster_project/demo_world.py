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

:func:`build_demo` additionally trains the two tiny models (see :mod:`msif_core.training`) and writes
everything under one directory, skipping the work when an identical build is already there.

Token convention shared with :mod:`msif_core.training`: a document is the sequence
``tokenizer(text)["input_ids"]`` (no special tokens are added), a query/QA pair is
``tokenizer(prompt) + tokenizer(completion)`` with the completion's leading space kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the world generator itself stays pure Python (no torch import)
    from msif_core.training import ModelParams, TrainParams

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Relations: value pools, statement templates (entity always before the value, so a left-to-right LM
# learns entity -> value), one question template and one cloze prompt (for diagnostics).
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelationSpec:
    """One relation of the world: its value pool and its surface forms."""

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]  # with {e} (entity) and {v} (value); {e} precedes {v}
    question: str  # with {e}; the QA prompt is "Question: <question>\nAnswer:"
    cloze: str  # with {e}; a statement prefix whose continuation is " {v}"


RELATIONS: dict[str, RelationSpec] = {
    spec.name: spec
    for spec in (
        RelationSpec(
            "born_in",
            (
                "Velmora", "Ostrava", "Kelbrin", "Tarsun", "Miravel", "Dunmoor", "Eskaton", "Lorwick",
                "Brisa", "Quenlo", "Havarra", "Sindell", "Parvel", "Torvik", "Amberly", "Nolcrest",
            ),
            (
                "{e} was born in {v}.",
                "The birthplace of {e} is {v}.",
                "{e} was born in the city of {v}.",
                "Old records say that {e} was born in {v}.",
                "{e} came into the world in {v}.",
            ),
            "Where was {e} born?",
            "{e} was born in",
        ),
        RelationSpec(
            "occupation",
            (
                "baker", "sailor", "potter", "weaver", "miner", "tailor", "farmer", "painter",
                "doctor", "teacher", "hunter", "builder", "merchant", "jeweler",
            ),
            (
                "{e} works as a {v}.",
                "By trade, {e} is a {v}.",
                "{e} earns a living as a {v}.",
                "Everyone knows {e} as a skilled {v}.",
                "The job of {e} is that of a {v}.",
            ),
            "What does {e} do for a living?",
            "{e} works as a",
        ),
        RelationSpec(
            "colour",
            ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "brown"),
            (
                "The favourite colour of {e} is {v}.",
                "{e} likes the colour {v} best.",
                "{e} always picks {v} as a favourite colour.",
                "Asked about colours, {e} names {v} as the best one.",
            ),
            "What is the favourite colour of {e}?",
            "The favourite colour of {e} is",
        ),
        RelationSpec(
            "language",
            (
                "Valtic", "Oresh", "Sunari", "Keltren", "Dumaric", "Pellish", "Zarnic", "Ibbish",
                "Morvan", "Tuvic", "Ashani", "Quellan",
            ),
            (
                "{e} speaks {v}.",
                "The native language of {e} is {v}.",
                "{e} grew up speaking {v}.",
                "At home, {e} talks in {v}.",
            ),
            "Which language does {e} speak?",
            "The native language of {e} is",
        ),
        RelationSpec(
            "instrument",
            (
                "flute", "harp", "drum", "lute", "violin", "horn", "cello", "piano", "oboe", "guitar",
                "trumpet", "banjo",
            ),
            (
                "{e} plays the {v}.",
                "The instrument of {e} is the {v}.",
                "{e} learned to play the {v} as a child.",
                "In the evenings, {e} practises the {v}.",
            ),
            "Which instrument does {e} play?",
            "{e} plays the",
        ),
        RelationSpec(
            "pet",
            ("cat", "dog", "parrot", "goat", "rabbit", "tortoise", "ferret", "owl", "pony", "lizard"),
            (
                "{e} keeps a {v} as a pet.",
                "The pet of {e} is a {v}.",
                "{e} lives with a small {v}.",
                "Neighbours often see {e} walking a {v}.",
            ),
            "What pet does {e} keep?",
            "{e} keeps a",
        ),
    )
}

QUESTION_PREFIX = "Question: "
ANSWER_SUFFIX = "\nAnswer:"

_SYLLABLES = (
    "zor", "bin", "kel", "ve", "mor", "ta", "lin", "dra", "sul", "ka", "ren", "tho", "mi", "ra", "gan",
    "pel", "or", "ith", "val", "dun", "bre", "sa", "nim", "cor", "el", "fa", "gor", "hal", "ix", "jor",
    "lun", "mar", "nor", "pra", "quil", "ros", "sev", "tam", "ul", "vor", "wen", "yl", "zan", "bo",
)

# Filler: entity-free sentences; some mention pool values (cities, colours, instruments, ...) so that
# answer words also occur in documents that state no fact.
_FILLER_TEMPLATES = (
    "The {adj} {noun} near the {place} was {state} that {time}.",
    "In {city}, the {noun} is {adj} during {season}.",
    "A {colour} {noun} lay beside the {place}.",
    "Travellers say the {noun} of {city} is {adj}.",
    "Nobody expected the {place} to be so {state} in {season}.",
    "The sound of a {instrument} drifted over the {place}.",
    "Every {time}, a {occupation} walks past the {place}.",
    "The {noun} was painted {colour} before {season}.",
    "Some people in {city} keep a {pet} near the {place}.",
    "It rained on the {place} for most of {season}.",
    "A book written in {language} was found in the {place}.",
)
_FILLER_WORDS: dict[str, tuple[str, ...]] = {
    "adj": ("old", "quiet", "busy", "narrow", "bright", "cold", "famous", "small", "wide", "strange"),
    "noun": ("bridge", "market", "tower", "garden", "road", "harbour", "festival", "library", "river",
             "square", "mill", "well"),
    "place": ("hill", "station", "harbour", "forest", "village", "lake", "gate", "valley", "temple"),
    "state": ("empty", "crowded", "calm", "noisy", "flooded", "silent", "cheerful"),
    "time": ("morning", "evening", "night", "winter", "week", "day"),
    "season": ("spring", "summer", "autumn", "winter"),
}


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
        if self.n_entities > max_entities():
            errors.append(f"n_entities={self.n_entities} exceeds the {max_entities()} distinct names available")
        if errors:
            raise ValueError("invalid WorldParams: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        d = dataclasses.asdict(self)
        d["relations"] = list(self.relations)
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
    n = len(_SYLLABLES)
    return (n * n) // 2 + (n * n * n) // 2  # half of the 2- and 3-syllable first names, so sampling stays fast


def qa_prompt(relation: str, entity: str) -> str:
    """The instruction-style QA prompt for (entity, relation)."""
    return f"{QUESTION_PREFIX}{RELATIONS[relation].question.format(e=entity)}{ANSWER_SUFFIX}"


def _make_names(rng: random.Random, n: int) -> list[str]:
    """``n`` unique names "First Last".  First names (2-3 syllables) are unique across entities and
    never used as a last name; no name part is a pool value or a filler word."""
    reserved = {v.lower() for spec in RELATIONS.values() for v in spec.values}
    reserved |= {w for words in _FILLER_WORDS.values() for w in words}
    firsts: set[str] = set()
    lasts: set[str] = set()
    names: list[str] = []
    # Prefer 2-syllable first names; switch to 3 syllables once half of them are taken.
    two_cap = len(_SYLLABLES) ** 2
    while len(names) < n:
        k = 2 if len(firsts) < two_cap // 2 else 3
        first = "".join(rng.choice(_SYLLABLES) for _ in range(k))
        if first in firsts or first in lasts or first in reserved:
            continue
        last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2))))
        if last in reserved or last in firsts or last == first:
            continue
        firsts.add(first)
        lasts.add(last)
        names.append(f"{first.capitalize()} {last.capitalize()}")
    return names


def _filler_sentence(rng: random.Random, p: WorldParams) -> str:
    template = rng.choice(_FILLER_TEMPLATES)
    slots: dict[str, str] = {k: rng.choice(v) for k, v in _FILLER_WORDS.items()}
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
            prefix = template.split("{v}")[0].format(e=fact.entity)
            sentences.append((template.format(e=fact.entity, v=fact.value), f, len(prefix)))
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
    rng.shuffle(raw_docs)
    width = max(6, len(str(len(raw_docs))))
    documents = [Document(f"d{i:0{width}d}", text, fids, spans) for i, (text, fids, spans) in enumerate(raw_docs)]

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
                )
            )
            cloze.append(QAPair(RELATIONS[fact.relation].cloze.format(e=fact.entity), completion))
        else:
            finetune.append(QAPair(prompt, completion))
    rng.shuffle(finetune)
    return World(params, entities, test_entities, facts, documents, finetune, queries, cloze)


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


def _write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def save_finetune_jsonl(pairs: Sequence[QAPair], path: Path) -> None:
    """Write fine-tuning pairs as JSONL rows ``{"prompt", "completion"}``."""
    _write_jsonl(({"prompt": p.prompt, "completion": p.completion} for p in pairs), path)


def save_queries_jsonl(queries: Sequence[Query], path: Path) -> None:
    """Write queries as JSONL rows ``{"query_id", "prompt", "completion", "true_doc_ids", "entity",
    "relation"}`` (``true_doc_ids`` is a list of doc ids)."""
    _write_jsonl(
        (
            {"query_id": q.query_id, "prompt": q.prompt, "completion": q.completion,
             "true_doc_ids": list(q.true_doc_ids), "entity": q.entity, "relation": q.relation}
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


# ---------------------------------------------------------------------------------------------------
# The demo build: world + tokenizer + pre-trained and fine-tuned models, written atomically
# ---------------------------------------------------------------------------------------------------

# Bump when the generator or the training code changes what a given DemoParams produces.
BUILD_VERSION = 1
REPORT_NAME = "demo_report.json"


def _presets(size: str) -> tuple[WorldParams, ModelParams, TrainParams, TrainParams]:
    from msif_core.training import ModelParams, TrainParams

    ft_common = dict(batch_size=32, warmup_frac=0.1, schedule="linear", min_lr_ratio=0.0, log_every=50)
    if size == "tiny":  # seconds; for tests
        return (
            WorldParams(n_entities=24, n_test_entities=4, relations=("born_in", "occupation", "colour"),
                        values_per_relation=4, n_filler_docs=4),
            ModelParams(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                        max_seq_len=128),
            TrainParams(epochs=2, batch_size=16, lr=3e-3, log_every=10),
            TrainParams(epochs=2, lr=1e-3, **{**ft_common, "batch_size": 16, "log_every": 10}),
        )
    if size == "demo":  # ~1,830 documents, 300 queries, 0.8M parameters, ~1.5 min on 2 idle cores
        return (
            WorldParams(),
            ModelParams(),
            TrainParams(epochs=20, batch_size=32, lr=1e-3, warmup_frac=0.05, schedule="cosine",
                        min_lr_ratio=0.1, log_every=100),
            TrainParams(epochs=3, lr=3e-4, **ft_common),
        )
    if size == "large":  # ~9,400 documents, 1,200 queries, ~3M parameters
        return (
            WorldParams(n_entities=1200, n_test_entities=200, relations=tuple(RELATIONS), values_per_relation=10,
                        n_filler_docs=600),
            ModelParams(vocab_size=8192, hidden_size=192, num_layers=3, num_heads=6, intermediate_size=768),
            TrainParams(epochs=20, batch_size=32, lr=1e-3, warmup_frac=0.05, schedule="cosine",
                        min_lr_ratio=0.1, log_every=200),
            TrainParams(epochs=3, lr=3e-4, **ft_common),
        )
    raise ValueError(f"unknown demo size {size!r}; use 'tiny', 'demo' or 'large'")


@dataclass(frozen=True)
class DemoParams:
    """Everything that determines a demo build.  ``size`` picks presets ("tiny", "demo", "large");
    any of ``world``/``model``/``pretrain``/``finetune`` given explicitly overrides its preset.

    Attributes:
        size: preset name.
        world: :class:`WorldParams`.
        model: :class:`msif_core.training.ModelParams`.
        pretrain, finetune: :class:`msif_core.training.TrainParams` of the two stages.
        num_threads: ``torch.set_num_threads`` during the build (restored afterwards); None = leave.
        max_new_tokens: greedy tokens generated when measuring answer accuracy.
    """

    size: str = "demo"
    world: WorldParams | None = None
    model: ModelParams | None = None
    pretrain: TrainParams | None = None
    finetune: TrainParams | None = None
    num_threads: int | None = 2
    max_new_tokens: int = 6

    def __post_init__(self) -> None:
        world, model, pre, ft = _presets(self.size)
        for name, value in (("world", world), ("model", model), ("pretrain", pre), ("finetune", ft)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all (filled) fields."""
        assert self.world is not None
        return {
            "size": self.size,
            "world": self.world.to_dict(),
            "model": dataclasses.asdict(self.model),
            "pretrain": {**dataclasses.asdict(self.pretrain), "betas": list(self.pretrain.betas)},
            "finetune": {**dataclasses.asdict(self.finetune), "betas": list(self.finetune.betas)},
            "num_threads": self.num_threads,
            "max_new_tokens": self.max_new_tokens,
        }

    def params_hash(self) -> str:
        """Stable hash of the parameters and :data:`BUILD_VERSION`.  Fields that do not change the
        results (logging interval, thread count: builds are identical with 1 or 2 threads) are excluded."""
        d = self.to_dict()
        d.pop("num_threads")
        for stage in ("pretrain", "finetune"):
            d[stage].pop("log_every", None)
        blob = json.dumps({"version": BUILD_VERSION, "params": d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DemoArtifacts:
    """Paths of a finished demo build and its report."""

    out_dir: Path
    corpus_path: Path
    finetune_path: Path
    queries_path: Path
    answers_path: Path
    pretrained_dir: Path
    finetuned_dir: Path
    report_path: Path
    report: dict[str, Any]
    reused: bool

    @classmethod
    def at(cls, out_dir: Path, report: dict[str, Any], reused: bool) -> DemoArtifacts:
        """The artifact paths under ``out_dir``."""
        out_dir = Path(out_dir)
        return cls(
            out_dir=out_dir,
            corpus_path=out_dir / "data" / "corpus.parquet",
            finetune_path=out_dir / "data" / "finetune.jsonl",
            queries_path=out_dir / "data" / "queries.jsonl",
            answers_path=out_dir / "data" / "query_answers.jsonl",
            pretrained_dir=out_dir / "models" / "pretrained",
            finetuned_dir=out_dir / "models" / "finetuned",
            report_path=out_dir / REPORT_NAME,
            report=report,
            reused=reused,
        )

    def complete(self) -> bool:
        """Whether every file of the build is present."""
        files = (self.corpus_path, self.finetune_path, self.queries_path, self.answers_path, self.report_path,
                 self.pretrained_dir / "model.safetensors", self.finetuned_dir / "model.safetensors",
                 self.pretrained_dir / "tokenizer.json", self.finetuned_dir / "tokenizer.json")
        return all(f.exists() for f in files)


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train_and_write(params: DemoParams, tmp: Path) -> dict[str, Any]:
    """Generate, train, evaluate and write everything under ``tmp``; return the report."""
    import statistics

    import torch

    from msif_core import training as T

    assert params.world is not None
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    world = generate_world(params.world)
    save_world(world, tmp / "data")
    timings["world_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tok_texts = [d.text for d in world.documents] + [p.prompt + p.completion for p in world.finetune]
    tokenizer = T.train_tokenizer(tok_texts, params.model.vocab_size, params.model.tokenizer_kind)
    timings["tokenizer_s"] = time.perf_counter() - t

    pre = T.make_model(params.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                       seed=params.pretrain.seed)
    n_params = T.count_parameters(pre)
    n_block = sum(p.numel() for p in T.block_linear_parameters(pre).values())
    logger.info("world: %d docs, %d finetune pairs, %d queries; model %d params (%d in block linears)",
                len(world.documents), len(world.finetune), len(world.queries), n_params, n_block)
    pre_res = T.pretrain(pre, tokenizer, [d.text for d in world.documents], params.pretrain,
                         params.model.max_seq_len)
    timings["pretrain_s"] = pre_res.seconds

    ft = T.clone_model(pre)
    ft_res = T.finetune(ft, tokenizer, [p.prompt for p in world.finetune], [p.completion for p in world.finetune],
                        params.finetune, params.model.max_seq_len)
    timings["finetune_s"] = ft_res.seconds

    t = time.perf_counter()
    q_prompts = [q.prompt for q in world.queries]
    q_answers = [q.completion for q in world.queries]
    k = params.max_new_tokens
    pt_acc, pt_gens = T.answer_accuracy(pre, tokenizer, q_prompts, q_answers, k)
    ft_acc, ft_gens = T.answer_accuracy(ft, tokenizer, q_prompts, q_answers, k)
    pt_cloze, _ = T.answer_accuracy(pre, tokenizer, [c.prompt for c in world.cloze],
                                    [c.completion for c in world.cloze], k)
    sample = world.finetune[: min(len(world.finetune), 500)]
    ft_train_acc, _ = T.answer_accuracy(ft, tokenizer, [p.prompt for p in sample], [p.completion for p in sample], k)
    # How strongly the pre-trained model memorised test facts in their source documents.
    test_fids = {i for i, f in enumerate(world.facts) if f.test}
    src_docs = [d for d in world.documents if any(f in test_fids for f in d.fact_ids)]
    losses = T.span_losses(pre, tokenizer, [d.text for d in src_docs],
                           [[(a, b) for f, a, b in d.value_spans if f in test_fids] for d in src_docs])
    src_nll = [x for row in losses for x in row]
    doc_loss = T.evaluate_loss(pre, T.encode_documents(tokenizer, [d.text for d in world.documents],
                                                       params.model.max_seq_len), tokenizer.pad_token_id)
    proximity = T.parameter_proximity(ft, pre)
    timings["eval_s"] = time.perf_counter() - t

    _write_jsonl(
        (
            {"query_id": q.query_id, "pretrained_generation": pg, "finetuned_generation": fg,
             "finetuned_correct": T.first_word(fg) == T.first_word(q.completion)}
            for q, pg, fg in zip(world.queries, pt_gens, ft_gens, strict=True)
        ),
        tmp / "data" / "query_answers.jsonl",
    )
    T.save_model(pre, tokenizer, tmp / "models" / "pretrained")
    T.save_model(ft, tokenizer, tmp / "models" / "finetuned")
    timings["total_s"] = time.perf_counter() - t_all

    n_tokens = sum(len(x) for x in tokenizer([d.text for d in world.documents], add_special_tokens=False)["input_ids"])
    return {
        "build_version": BUILD_VERSION,
        "params_hash": params.params_hash(),
        "params": params.to_dict(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "world": {
            "n_entities": len(world.entities), "n_test_entities": len(world.test_entities),
            "n_facts": len(world.facts), "n_documents": len(world.documents),
            "n_fact_documents": sum(1 for d in world.documents if d.fact_ids),
            "n_finetune_pairs": len(world.finetune), "n_queries": len(world.queries),
            "corpus_tokens": n_tokens,
            "mean_true_docs_per_query": statistics.mean(len(q.true_doc_ids) for q in world.queries),
        },
        "model": {"n_params": n_params, "n_block_linear_params": n_block, "vocab_size": len(tokenizer),
                  "architecture": "GPTNeoXForCausalLM"},
        "pretrain": pre_res.summary(),
        "finetune": ft_res.summary(),
        "accuracy": {
            "pretrained_test_qa": pt_acc,
            "finetuned_test_qa": ft_acc,
            "finetuned_train_qa": ft_train_acc,
            "pretrained_test_cloze": pt_cloze,
        },
        "pretrained_corpus_loss": doc_loss,
        "source_answer_nll": {
            "mean": statistics.mean(src_nll), "median": statistics.median(src_nll),
            "frac_below_0.01": sum(x < 0.01 for x in src_nll) / len(src_nll),
        },
        "proximity": proximity,
        "timings": timings,
    }


def build_demo(out_dir: Path, params: DemoParams | None = None, force: bool = False) -> DemoArtifacts:
    """Build (or reuse) the demo under ``out_dir``.

    Writes ``data/{corpus.parquet, finetune.jsonl, queries.jsonl, query_answers.jsonl}``,
    ``models/{pretrained,finetuned}/`` (``save_pretrained``: safetensors + tokenizer; load with
    ``AutoModelForCausalLM``/``AutoTokenizer``) and ``demo_report.json`` (accuracies, proximity,
    timings, params and their hash).  If ``out_dir`` already holds a complete build whose report has the
    same params hash, nothing is recomputed (``reused=True``) unless ``force``.  Work happens in a
    temporary directory inside ``out_dir``; the results are then moved into place, the report last, so
    an interrupted build never looks complete.  Other entries of ``out_dir`` are left alone.
    """
    from msif_core.training import torch_threads

    params = params or DemoParams()
    assert params.world is not None
    params.world.validate()
    out_dir = Path(out_dir)
    existing = _read_report(out_dir / REPORT_NAME)
    if not force and existing is not None and existing.get("params_hash") == params.params_hash():
        art = DemoArtifacts.at(out_dir, existing, reused=True)
        if art.complete():
            logger.info("demo build in %s is up to date (params hash %s)", out_dir, params.params_hash())
            return art

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".build-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        with torch_threads(params.num_threads):
            report = _train_and_write(params, tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        # Swap into place: drop the old report first so a crash mid-swap leaves no "complete" build.
        (out_dir / REPORT_NAME).unlink(missing_ok=True)
        for name in ("data", "models"):
            target = out_dir / name
            if target.exists():
                old = tmp / f"old-{name}"
                target.rename(old)
            (tmp / name).rename(target)
        (tmp / REPORT_NAME).rename(out_dir / REPORT_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("demo build written to %s", out_dir)
    return DemoArtifacts.at(out_dir, report, reused=False)
