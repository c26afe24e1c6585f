"""The public, one-call API: from two checkpoints and three data sets to a table of influence scores.

Example::

    from msif_core import attribute, AttributionSettings
    table = attribute("ckpt/pretrained", "ckpt/finetuned",
                      documents=[("d1", "Zorbin Kel was born in Velmora."), ...],
                      finetuning=[("Question: Where was Ada born?\\nAnswer:", " Paris"), ...],
                      queries=[("q1", "Question: Where was Zorbin Kel born?\\nAnswer:", " Velmora")])
    table[table.method == "ms_if"].sort_values("rank").head()

Each step is also a function of its own module (``models``, ``data``, ``ekfac``, ``query``,
``scoring``), which is how the Dagster pipeline calls them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import Encoded, encode_classification, encode_documents, encode_pairs, pad_id_of
from .ekfac import Factors, FitSettings, fit_ekfac
from .memory import retain_freed_memory
from .models import LoadedModel, ModuleSpec, check_compatible, discover_modules, load_model
from .query import measurement_gradients, query_ihvps
from .scoring import ScoreResult, score_documents

log = logging.getLogger(__name__)


@dataclass
class AttributionSettings:
    """Settings of one attribution run (the ``[factors]`` and ``[scores]`` of an experiment file)."""

    fisher: str = field(default="true", metadata={"help": "'true' (sampled targets) or 'empirical'"})
    attention_blocks: str = field(default="per_head", metadata={"help": "'per_head' or 'fused'"})
    modules: str = field(default="all", metadata={"help": "'all' or 'mlp' (MLP projections only)"})
    max_examples: int = field(default=100_000, metadata={"help": "cap on sequences per factor fit"})
    max_length: int = field(default=512, metadata={"help": "tokens per sequence; longer ones are truncated"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward pass"})
    damping_pretrain: float | str = field(default=1e-4, metadata={"help": "number or 'relative:c'"})
    damping_finetune: float | str = field(default=1e-4, metadata={"help": "number or 'relative:c'"})
    query_rank: int = field(default=0, metadata={"help": "0 exact; r > 0 keeps rank-r query iHVPs"})
    seed: int = field(default=0, metadata={"help": "seed of the true-Fisher sampling"})
    methods: tuple[str, ...] = field(default=("ms_if", "ss_if", "gdp"), metadata={"help": "gradient methods"})
    module_tags: dict[str, str] | None = field(default=None, metadata={
        "help": "for architectures msif does not know: {module name: 'mlp' | 'mha'}, each module one block; "
                "replaces the automatic discovery"})

    def fit_settings(self) -> FitSettings:
        """The EK-FAC part of these settings."""
        return FitSettings(fisher=self.fisher, max_examples=self.max_examples, batch_size=self.batch_size,
                           seed=self.seed)


@dataclass
class Stage:
    """A loaded model with its analysed modules."""

    loaded: LoadedModel
    specs: list[ModuleSpec]

    @property
    def model(self) -> torch.nn.Module:
        """The torch model."""
        return self.loaded.model

    @property
    def pad_id(self) -> int:
        """Padding id: the model config's ``pad_token_id`` when set (a classification head finds each row's
        last real token by it, so padding with another id would score the wrong token), else the tokenizer's."""
        cfg = self.model.config
        pad, vocab = getattr(cfg, "pad_token_id", None), getattr(cfg, "vocab_size", None)
        if isinstance(pad, int) and pad >= 0 and (vocab is None or pad < vocab):
            return pad
        return pad_id_of(self.loaded.tokenizer)


def load_stages(pretrained: str | Path, finetuned: str | Path, settings: AttributionSettings,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Stage, Stage]:
    """Load both checkpoints and keep the analysed modules they share (shapes must agree)."""
    pt = load_model(pretrained, task="causal_lm", dtype=dtype, device=device)
    ft = load_model(finetuned, dtype=dtype, device=device)
    pt_specs = discover_modules(pt.model, settings.attention_blocks, settings.modules, settings.module_tags)
    ft_specs = discover_modules(ft.model, settings.attention_blocks, settings.modules, settings.module_tags)
    common = set(check_compatible(pt_specs, ft_specs))
    skipped = [s.name for s in pt_specs + ft_specs if s.name not in common]
    if skipped:
        log.info("analysing %d shared modules; skipping %d found in one model only", len(common), len(skipped))
    return (Stage(pt, [s for s in pt_specs if s.name in common]),
            Stage(ft, [s for s in ft_specs if s.name in common]))


def encode_queries(stage: Stage, prompts: Sequence[str], completions: Sequence, max_length: int) -> Encoded:
    """Queries for the fine-tuned model: completion tokens, or a label for a classification head."""
    tok = stage.loaded.tokenizer
    if stage.loaded.task == "sequence_classification":
        label2id = getattr(stage.model.config, "label2id", {}) or {}
        labels = [int(c) if str(c).strip().lstrip("-").isdigit() else label2id[str(c).strip()] for c in completions]
        return encode_classification(tok, prompts, labels, max_length)
    return encode_pairs(tok, prompts, completions, max_length)


def fit_stage_factors(stage: Stage, encoded: Encoded, settings: AttributionSettings) -> Factors:
    """EK-FAC factors of one stage's model on its own data."""
    return fit_ekfac(stage.model, stage.specs, encoded, settings.fit_settings(), stage.pad_id)


def score_method(method: str, pt: Stage, ft: Stage, query_grads: Mapping[str, torch.Tensor], docs: Encoded,
                 settings: AttributionSettings, pt_factors: Factors | None, ft_factors: Factors | None) -> ScoreResult:
    """Query iHVPs for ``method`` and the scores of every document in ``docs``."""
    ih = query_ihvps(query_grads, ft.specs, method, ft_factors, pt_factors, settings.damping_finetune,
                     settings.damping_pretrain, settings.query_rank)
    if method == "ss_if":
        if ft.loaded.task != "causal_lm":
            raise ValueError("ss_if scores documents with the fine-tuned model's language-model loss; a "
                             "fine-tune with a classification head has none: use ms_if or gdp")
        return score_documents(ft.model, ih, docs, settings.batch_size, ft.pad_id)
    return score_documents(pt.model, ih, docs, settings.batch_size, pt.pad_id)


def scores_table(result: ScoreResult, method: str, doc_ids: Sequence[str], query_ids: Sequence[str],
                 damping: dict | None = None) -> pd.DataFrame:
    """Long table: query_id, doc_id, method, score, mlp_score, mha_score, rank (1 = most supporting)."""
    n, q = result.scores.shape
    df = pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), n),
        "doc_id": np.tile(np.asarray(doc_ids, dtype=object), q),
        "method": method,
        "score": result.scores.T.reshape(-1),
        "mlp_score": result.part("mlp").T.reshape(-1),
        "mha_score": result.part("mha").T.reshape(-1),
    })
    df["rank"] = df.groupby("query_id", sort=False)["score"].rank(ascending=False, method="first").astype("int64")
    for k, v in (damping or {}).items():
        df[k] = v
    return df


def attribute(pretrained: str | Path, finetuned: str | Path, documents: Sequence[tuple[str, str]],
              finetuning: Sequence[tuple[str, str]], queries: Sequence[tuple[str, str, str]],
              settings: AttributionSettings | None = None, device: str = "cpu") -> pd.DataFrame:
    """Score every document against every query with each method in ``settings.methods``.

    Args:
        pretrained, finetuned: local checkpoint directories.
        documents: (doc_id, text) pairs of the pre-training corpus (or the candidates to score).
        finetuning: (prompt, completion) pairs the fine-tuned model was trained on.
        queries: (query_id, prompt, completion) triples answered by the fine-tuned model.
    Returns:
        A long DataFrame; positive scores mean the document supports the completion, rank 1 first.
    """
    settings = settings or AttributionSettings()
    need_ft = any(m in ("ms_if", "ss_if") for m in settings.methods)
    for what, given, fix in (("documents", documents, "pass the pre-training documents as (doc_id, text) pairs"),
                             ("queries", queries, "pass (query_id, prompt, completion) triples"),
                             ("finetuning", finetuning if need_ft else [None],
                              "pass the (prompt, completion) pairs the model was fine-tuned on (ms_if and "
                              "ss_if fit its EK-FAC on them), or use methods=('gdp',)")):
        if len(given) == 0:
            raise ValueError(f"{what} is empty. Fix: {fix}")
    retain_freed_memory()
    t0 = time.perf_counter()
    pt, ft = load_stages(pretrained, finetuned, settings, device=device)
    docs = encode_documents(pt.loaded.tokenizer, [t for _, t in documents], settings.max_length)
    if len(docs) == 0:
        raise ValueError(f"documents: none of the {len(documents)} has the 2 tokens scoring needs. Fix: pass "
                         f"longer texts")
    doc_ids = [documents[i][0] for i in docs.kept]
    qenc = encode_queries(ft, [p for _, p, _ in queries], [c for _, _, c in queries], settings.max_length)
    if len(qenc) == 0:
        raise ValueError(f"queries: none of the {len(queries)} has a completion token within max_length="
                         f"{settings.max_length}. Fix: give each query a non-empty completion")
    query_ids = [queries[i][0] for i in qenc.kept]
    ft_factors = pt_factors = None
    if need_ft:
        fenc = encode_queries(ft, [p for p, _ in finetuning], [c for _, c in finetuning], settings.max_length)
        if len(fenc) == 0:
            raise ValueError(f"finetuning: none of the {len(finetuning)} pairs has a completion token within "
                             f"max_length={settings.max_length}. Fix: give each pair a non-empty completion")
        ft_factors = fit_stage_factors(ft, fenc, settings)
    if "ms_if" in settings.methods:
        pt_factors = fit_stage_factors(pt, docs, settings)
    grads = measurement_gradients(ft.model, ft.specs, qenc, settings.batch_size, ft.pad_id)
    tables = []
    for method in settings.methods:
        res = score_method(method, pt, ft, grads, docs, settings, pt_factors, ft_factors)
        tables.append(scores_table(res, method, doc_ids, query_ids))
    log.info("attributed %d queries over %d documents in %.1fs", len(query_ids), len(doc_ids),
             time.perf_counter() - t0)
    return pd.concat(tables, ignore_index=True)
