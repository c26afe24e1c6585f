"""A tiny world for the pipeline tests: a few dozen documents, two tiny random GPT-NeoX checkpoints and a
word-level tokenizer, written like a user's experiment (checkpoints, Parquet corpus, JSONL data, TOML)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import dagster as dg
import pandas as pd

NAMES = ["Zorbin", "Kelda", "Murak", "Talsi", "Venno", "Pirra", "Quell", "Doran", "Essa", "Falk", "Gorm", "Hild"]
CITIES = ["Velmora", "Oskir", "Tarn", "Lumen", "Brask"]
JOBS = ["baker", "pilot", "weaver", "miner"]
FILLER = ["the river runs slowly", "winter came early that year", "the market was quiet", "rain fell on the hills"]


def corpus_rows(n_docs: int, seed: int = 0) -> list[dict]:
    """Documents d000..: a fact or two per document, and filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_docs):
        who = NAMES[i % len(NAMES)]
        if i == 2:  # longer than the worlds' max_length (32 tokens): truncated, and counted
            text = " . ".join(rng.choice(FILLER) for _ in range(9)) + " ."
        elif i % 3 == 2:
            text = f"{rng.choice(FILLER)} . {rng.choice(FILLER)} ."
        elif i % 3 == 1:
            text = f"{who} works as a {JOBS[i % len(JOBS)]} . {rng.choice(FILLER)} ."
        else:
            text = f"{who} was born in {CITIES[i % len(CITIES)]} . {rng.choice(FILLER)} ."
        rows.append({"doc_id": f"d{i:03d}", "text": text})
    return rows


def _vocab(texts: list[str]) -> dict[str, int]:
    words = sorted({w for t in texts for w in t.split()})
    special = ["[PAD]", "[UNK]", "[EOS]"]
    return {w: i for i, w in enumerate(special + words)}


def save_checkpoint(path: Path, vocab: dict[str, int], seed: int, hidden: int = 32) -> None:
    """A random tiny GPT-NeoX causal LM and a WordLevel tokenizer, written with save_pretrained."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0, eos_token_id=2,
                        bos_token_id=2)
    model = GPTNeoXForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)


def perturb_checkpoint(src: Path, dst: Path, seed: int, scale: float = 0.02) -> None:
    """A 'fine-tuned' checkpoint: ``src`` with small random changes to every weight."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def build_world(root: Path, n_docs: int = 40, shard_size: int = 16, candidates: int | str = 6,
                methods: tuple[str, ...] = ("ms_if", "ss_if", "gdp", "repsim", "bm25", "retriever"),
                extra_toml: str = "") -> Path:
    """Write the world under ``root`` and return the path of its experiment TOML file (``extra_toml``:
    more sections, e.g. ``[index]``)."""
    docs = corpus_rows(n_docs)
    extra = [f"{n} was born in {c} ." for n in NAMES for c in CITIES] + [f"{n} works as a {j} ." for n in NAMES
                                                                        for j in JOBS]
    vocab = _vocab([d["text"] for d in docs] + extra + ["Question: Where was born ? Answer: What does do ?"])
    save_checkpoint(root / "ckpt" / "pretrained", vocab, seed=0)
    perturb_checkpoint(root / "ckpt" / "pretrained", root / "ckpt" / "finetuned", seed=1)
    (root / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(docs).to_parquet(root / "data" / "corpus.parquet", index=False)
    ft = [{"prompt": f"Question: Where was {n} born ? Answer:", "completion": f" {CITIES[i % len(CITIES)]}"}
          for i, n in enumerate(NAMES[:8])]
    (root / "data" / "finetune.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ft))
    queries = []
    for j, i in enumerate([0, 3, 6, 9, 12, 15]):
        who, city = NAMES[i % len(NAMES)], CITIES[i % len(CITIES)]
        true = [d["doc_id"] for d in docs if d["text"].startswith(f"{who} was born in {city} ")]
        queries.append({"query_id": f"q{j}", "prompt": f"Question: Where was {who} born ? Answer:",
                        "completion": f" {city}", "true_doc_ids": true})
    (root / "data" / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    cand = f'"{candidates}"' if isinstance(candidates, str) else str(candidates)
    toml = f"""
[lakehouse]
root = "lakehouse"

[models]
pretrained = "ckpt/pretrained"
finetuned = "ckpt/finetuned"

[data]
pretraining_corpus = "data/corpus.parquet"
finetuning_data = "data/finetune.jsonl"
queries = "data/queries.jsonl"
shard_size = {shard_size}

[factors]
max_length = 32
batch_size = 8

[scores]
methods = {json.dumps(list(methods))}
damping_pretrain = 1e-3
damping_finetune = "relative:0.1"
candidates = {cand}
{extra_toml}"""
    path = root / "experiment.toml"
    path.write_text(toml)
    return path


def make_pipeline(toml: Path, instance: dg.DagsterInstance | None = None, echo=None):
    """(cfg, defs, pipeline) for an experiment file, on a CPU device."""
    from msif_assets.build import build_definitions
    from msif_assets.config import load_config
    from msif_assets.resources import DeviceResource
    from msif_assets.runner import Pipeline

    cfg = load_config(toml)
    defs = build_definitions(cfg, device=DeviceResource(device="cpu"))
    instance = instance or dg.DagsterInstance.ephemeral()
    return cfg, defs, Pipeline(defs, instance, cfg, echo=echo or print)


def materializations_since(instance: dg.DagsterInstance, storage_id: int) -> set[tuple[str, str | None]]:
    """(asset, partition) of every materialisation recorded after ``storage_id``, from the event log."""
    recs = instance.get_event_records(
        dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION, after_cursor=storage_id),
        limit=100_000)
    out = set()
    for r in recs:
        m = r.event_log_entry.asset_materialization
        out.add((m.asset_key.to_user_string(), m.partition))
    return out


def latest_storage_id(instance: dg.DagsterInstance) -> int:
    """The storage id of the newest event (0 when the log is empty)."""
    recs = instance.get_event_records(dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION),
                                      limit=1, ascending=False)
    obs = instance.get_event_records(dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_OBSERVATION),
                                     limit=1, ascending=False)
    return max([r.storage_id for r in [*recs, *obs]] or [0])
