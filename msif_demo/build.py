"""The demo build: world + tokenizer + pre-trained and fine-tuned models, written atomically under one
folder, skipped when an identical build is already there (:func:`build_demo`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .relations import RELATIONS
from .world import WorldParams, generate_world, save_world, write_jsonl

if TYPE_CHECKING:  # the world generator itself stays pure Python (no torch import)
    from msif_core.training import ModelParams, TrainParams

logger = logging.getLogger(__name__)

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
    if size in ("demo", "alias"):  # ~1,830 documents, 300 queries, 0.8M parameters, ~1.5 min on 2 idle cores
        return (  # "alias": every entity's facts stated under an alias, +750 link documents (WorldParams.alias_share)
            WorldParams(alias_share=1.0) if size == "alias" else WorldParams(),
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
    raise ValueError(f"unknown demo size {size!r}; use 'tiny', 'demo', 'alias' or 'large'")


@dataclass(frozen=True)
class DemoParams:
    """Everything that determines a demo build.  ``size`` picks presets ("tiny", "demo", "large");
    any of ``world``/``model``/``pretrain``/``finetune`` given explicitly overrides its preset.

    Attributes:
        size: preset name ("alias": the demo world with every fact stated under an alias).
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

    write_jsonl(
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
