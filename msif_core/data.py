"""Tokens: turn documents and (prompt, completion) pairs into padded batches with loss masks.

Conventions used everywhere in msif:

- ``loss_mask[b, t]`` is True when token ``t`` of row ``b`` is a *target*: the logits at position
  ``t - 1`` are scored against it. Position 0 is never a target.
- Rows are right-padded; ``attention_mask`` is 0 on padding, and padding is never a target.
- A pre-training document is a target at every token but the first (``ℓ_pt`` sums its next-token
  cross-entropy). A (prompt, completion) pair is a target on the completion tokens only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """Tokenised examples, unpadded: one list of ids and one target mask per example."""

    input_ids: list[list[int]]
    loss_mask: list[list[bool]]
    labels: list[int] | None = None
    n_truncated: int = 0
    n_dropped: int = 0
    kept: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_tokens(self) -> int:
        """Total number of (unpadded) tokens."""
        return sum(len(x) for x in self.input_ids)

    def subset(self, index: Sequence[int]) -> Encoded:
        """The examples at ``index`` (positions in this object)."""
        return Encoded(
            input_ids=[self.input_ids[i] for i in index],
            loss_mask=[self.loss_mask[i] for i in index],
            labels=None if self.labels is None else [self.labels[i] for i in index],
            kept=[self.kept[i] for i in index] if self.kept else list(index),
        )


@dataclass
class Batch:
    """A padded batch. ``index`` holds the positions of its rows in the ``Encoded`` it came from."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    index: list[int]
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device),
            self.index,
            None if self.labels is None else self.labels.to(device),
        )

    @property
    def n_tokens(self) -> int:
        """Number of non-padding tokens."""
        return int(self.attention_mask.sum())


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_documents(tokenizer, texts: Sequence[str], max_length: int) -> Encoded:
    """Tokenise pre-training documents; every token after the first is a target.

    Documents longer than ``max_length`` tokens are truncated (counted in ``n_truncated`` and logged);
    documents with fewer than two tokens carry no target and are dropped (``n_dropped``).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    out = Encoded([], [])
    for i, text in enumerate(texts):
        ids = _ids(tokenizer, text)
        if len(ids) > max_length:
            ids = ids[:max_length]
            out.n_truncated += 1
        if len(ids) < 2:
            out.n_dropped += 1
            continue
        out.input_ids.append(ids)
        out.loss_mask.append([False] + [True] * (len(ids) - 1))
        out.kept.append(i)
    if out.n_truncated:
        log.warning("%d of %d documents were longer than %d tokens and were truncated",
                    out.n_truncated, len(texts), max_length)
    return out


def encode_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int) -> Encoded:
    """Tokenise (prompt, completion) pairs; only completion tokens are targets.

    Prompt and completion are tokenised separately and concatenated, so the target tokens are
    exactly the completion's. Too long a pair loses tokens from the start of its prompt first, then
    from the end of its completion (counted in ``n_truncated``).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    out = Encoded([], [])
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        p, c = _ids(tokenizer, prompt), _ids(tokenizer, completion)
        if not c:
            out.n_dropped += 1
            continue
        if len(p) + len(c) > max_length:
            out.n_truncated += 1
            c = c[: max_length - 1]
            p = p[len(p) - (max_length - len(c)):] if max_length - len(c) > 0 else []
        if not p:  # the first completion token needs a position before it
            c = c[1:]
            p = _ids(tokenizer, completion)[:1]
            if not c:
                out.n_dropped += 1
                continue
        out.input_ids.append(p + c)
        out.loss_mask.append([False] * len(p) + [True] * len(c))
        out.kept.append(i)
    if out.n_truncated:
        log.warning("%d of %d prompt/completion pairs were longer than %d tokens and were truncated",
                    out.n_truncated, len(prompts), max_length)
    return out


def encode_classification(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int) -> Encoded:
    """Tokenise texts for a sequence-classification head; the target is ``labels[i]``."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    out = Encoded([], [], labels=[])
    for i, (text, label) in enumerate(zip(texts, labels)):
        ids = _ids(tokenizer, text)
        if len(ids) > max_length:
            ids = ids[:max_length]
            out.n_truncated += 1
        if not ids:
            out.n_dropped += 1
            continue
        out.input_ids.append(ids)
        out.loss_mask.append([False] * len(ids))
        out.labels.append(int(label))
        out.kept.append(i)
    if out.n_truncated:
        log.warning("%d of %d texts were longer than %d tokens and were truncated",
                    out.n_truncated, len(texts), max_length)
    return out


def collate(encoded: Encoded, index: Sequence[int], pad_id: int = 0) -> Batch:
    """Right-pad the examples at ``index`` into one ``Batch``."""
    width = max(len(encoded.input_ids[i]) for i in index)
    n = len(index)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    for row, i in enumerate(index):
        k = len(encoded.input_ids[i])
        ids[row, :k] = torch.tensor(encoded.input_ids[i], dtype=torch.long)
        att[row, :k] = 1
        mask[row, :k] = torch.tensor(encoded.loss_mask[i], dtype=torch.bool)
    labels = None
    if encoded.labels is not None:
        labels = torch.tensor([encoded.labels[i] for i in index], dtype=torch.long)
    return Batch(ids, att, mask, list(index), labels)


def iter_batches(encoded: Encoded, batch_size: int, pad_id: int = 0, sort_by_length: bool = True) -> Iterator[Batch]:
    """Batches over all examples. Sorting by length (the default) keeps padding small; every
    batch's ``index`` says which examples it holds, so results map back to input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = list(range(len(encoded)))
    if sort_by_length:
        order.sort(key=lambda i: len(encoded.input_ids[i]))
    for start in range(0, len(order), batch_size):
        yield collate(encoded, order[start:start + batch_size], pad_id)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, falling back to eos, then 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0
