"""The two stages: both checkpoints loaded with the analysed modules they share, queries encoded for the
fine-tuned model, and the fine-tuned model's own answers to them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoints import LoadedModel, load_model
from .data import Encoded, encode_classification, encode_pairs, pad_id_of
from .models import ModuleSpec, check_compatible, discover_modules

if TYPE_CHECKING:
    from .api import AttributionSettings

log = logging.getLogger(__name__)


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


def answer_queries(ft: Stage, prompts: Sequence[str], completions: Sequence,
                   max_new_tokens: int = 6) -> tuple[list[str | None], list[bool | None]]:
    """The fine-tuned model's greedy answer to each prompt, and whether its first word is the completion's.

    ``None`` for a classification head, a model without tokenizer, or when generation fails (answers are
    a convenience; no score depends on them)."""
    none: tuple[list, list] = ([None] * len(prompts), [None] * len(prompts))
    if ft.loaded.task != "causal_lm" or ft.loaded.tokenizer is None:
        return none
    from .training import first_word, greedy_generate

    try:
        gens = greedy_generate(ft.model, ft.loaded.tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    except Exception as e:  # noqa: BLE001 - answers are a convenience; scores do not depend on them
        log.warning("could not generate answers: %s", e)
        return none
    return gens, [first_word(g) == first_word(str(c)) for g, c in zip(gens, completions)]
