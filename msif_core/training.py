"""Tokenizer training, the two training stages, greedy answering and accuracy (plain PyTorch).

Used to build the demo's two tiny models: a GPT-NeoX pre-trained from scratch on a synthetic corpus,
then a FULL-parameter fine-tune of a copy on QA pairs with the loss on the answer tokens only.

Sequence conventions (the influence code relies on them, SPEC section 1):

- a pre-training document is ``tokenizer(text)["input_ids"]``; the tokenizer adds no special tokens;
  the loss is next-token cross-entropy over all its tokens (the first token is not predicted);
- a QA example is ``tokenizer(prompt)["input_ids"] + tokenizer(completion)["input_ids"]`` (the
  completion keeps its leading space; byte-level pre-tokenisation makes this equal to tokenising the
  concatenated string for the demo data); only completion tokens are targets;
- batches are right-padded with ``tokenizer.pad_token_id`` and an attention mask; padding never has loss.

Encoding is :mod:`msif_core.data`'s (``encode_documents``, ``encode_pairs``). Training loss is the mean
over the batch's target tokens.  The learning-rate schedule (linear
warm-up, then cosine or linear decay) is stepped after EVERY optimiser step (SPEC section 5).

Why one file of ~490 lines: tokenizer, model construction, the two training stages and greedy
answering share the batching and loss conventions above; the demo build (:mod:`msif_demo.build`), the
benches and the query assets' answers all use them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch, Encoded, collate, encode_documents, encode_pairs, iter_batches

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|unk|>")


# ---------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelParams:
    """Shape of the GPT-NeoX model and of the tokenizer.

    Attributes:
        vocab_size: target tokenizer vocabulary (the model uses the tokenizer's actual size).
        tokenizer_kind: ``"bpe"`` (byte-level BPE) or ``"word"`` (byte-level pre-tokenised words).
        hidden_size, num_layers, num_heads, intermediate_size: transformer shape.
        max_seq_len: longest sequence (documents are truncated to it, with a warning).
        rotary_pct: fraction of each head's dimensions that use rotary position embedding.
    """

    vocab_size: int = 2048
    tokenizer_kind: str = "bpe"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_seq_len: int = 128
    rotary_pct: float = 0.25


@dataclass(frozen=True)
class TrainParams:
    """One training stage.

    Attributes:
        epochs: passes over the data.
        batch_size: sequences per optimiser step.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay (not applied to biases and layer norms).
        warmup_frac: fraction of the total steps used for linear warm-up from 0 to ``lr``.
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` decay after warm-up.
        min_lr_ratio: the decay ends at ``lr * min_lr_ratio``.
        grad_clip: max global gradient norm (0 disables clipping).
        betas: AdamW betas.
        seed: seeds the model initialisation (pre-training) and the batch shuffling.
        log_every: log a progress line every this many steps.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    seed: int = 0
    log_every: int = 50


@dataclass
class TrainResult:
    """What a training run reports."""

    steps: int
    seconds: float
    tokens: int
    tokens_per_s: float
    epoch_losses: list[float]
    final_loss: float  # mean loss over the last epoch
    lrs: list[float] = field(default_factory=list)  # learning rate used at every step

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-step learning rates)."""
        d = asdict(self)
        d.pop("lrs")
        return d


# ---------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048, kind: str = "bpe") -> Any:
    """Train a byte-level tokenizer on ``texts`` and wrap it as ``PreTrainedTokenizerFast``.

    ``kind="bpe"`` learns byte-level BPE merges up to ``vocab_size``; ``kind="word"`` keeps every
    whitespace-delimited word seen (at most ``vocab_size``, most frequent first) as one token and maps
    other words to ``<|unk|>``.  Both decode losslessly for seen text.  Special tokens: ``<|pad|>``
    (padding), ``<|endoftext|>`` (bos/eos, never added automatically) and ``<|unk|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
    else:
        raise ValueError(f"tokenizer kind must be 'bpe' or 'word', got {kind!r}")
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|unk|>",
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )


def make_model(params: ModelParams, vocab_size: int, pad_token_id: int, eos_token_id: int,
               seed: int = 0) -> nn.Module:
    """A freshly initialised ``GPTNeoXForCausalLM`` (dropout 0, untied embeddings), seeded by ``seed``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if params.hidden_size % params.num_heads:
        raise ValueError(f"hidden_size {params.hidden_size} not divisible by num_heads {params.num_heads}")
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=params.hidden_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        intermediate_size=params.intermediate_size,
        max_position_embeddings=params.max_seq_len,
        rotary_pct=params.rotary_pct,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=pad_token_id,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(seed)
        return GPTNeoXForCausalLM(config)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, tokenizer: Any, path: Path) -> None:
    """``save_pretrained`` the model (safetensors) and the tokenizer into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------------------------------
# Data: batching and loss (sequences are msif_core.data's Encoded: the same encoding the influence
# code uses, so a model is trained on exactly the targets it is later attributed on)
# ---------------------------------------------------------------------------------------------------


def batches(encoded: Encoded, batch_size: int, generator: torch.Generator, pad_id: int) -> Iterator[Batch]:
    """Shuffle with ``generator`` and yield padded batches (the last one may be smaller)."""
    order = torch.randperm(len(encoded), generator=generator).tolist()
    for i in range(0, len(order), batch_size):
        yield collate(encoded, order[i : i + batch_size], pad_id)


def causal_lm_loss(logits: torch.Tensor, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on the batch's targets: logits at t−1 score token t where
    ``loss_mask[t]``; other positions (prompt, padding, the first token) carry no loss.

    ``reduction``: ``"mean"`` over target tokens, ``"sum"``, or ``"none"`` (per-sequence sums, [batch]).
    """
    shift_logits = logits[:, :-1, :].float()
    labels = batch.input_ids[:, 1:].masked_fill(~batch.loss_mask[:, 1:], IGNORE_INDEX)
    per_tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    if reduction == "none":
        return per_tok.sum(dim=1)
    if reduction == "sum":
        return per_tok.sum()
    n = batch.loss_mask[:, 1:].sum().clamp(min=1)
    return per_tok.sum() / n


# ---------------------------------------------------------------------------------------------------
# Optimiser, schedule, training loop
# ---------------------------------------------------------------------------------------------------


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` steps (step 0 already gets ``1/warmup_steps``, step
    ``warmup_steps - 1`` the peak), then ``schedule`` decay from the peak to ``min_lr_ratio`` at the last
    step ``total_steps - 1``; every step gets a new value.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    anchor = max(warmup_steps - 1, 0)  # the step at which the peak is reached
    progress = min(1.0, max(0.0, (step - anchor) / max(1, total_steps - 1 - anchor)))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def make_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=params.lr, betas=params.betas)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                   params: TrainParams) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR implementing :func:`lr_factor` (call ``.step()`` after every optimiser step)."""
    warmup = int(round(params.warmup_frac * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps, warmup, params.schedule, params.min_lr_ratio),
    )


def train_causal_lm(model: nn.Module, examples: Encoded, params: TrainParams, pad_id: int,
                    name: str = "train", max_steps: int | None = None) -> TrainResult:
    """Train ``model`` in place on ``examples`` (mean loss over target tokens); return statistics.

    ``max_steps`` stops early (tests); the schedule is still laid out over all epochs' steps.
    """
    if len(examples) == 0:
        raise ValueError("no training examples")
    generator = torch.Generator().manual_seed(params.seed)
    steps_per_epoch = math.ceil(len(examples) / params.batch_size)
    total_steps = steps_per_epoch * params.epochs
    optimizer = make_optimizer(model, params)
    scheduler = make_scheduler(optimizer, total_steps, params)
    model.train()
    step, tokens = 0, 0
    lrs: list[float] = []
    epoch_losses: list[float] = []
    t0 = time.perf_counter()
    t_log, tok_log = t0, 0
    logger.info("%s: %d examples, %d epochs, %d steps, batch %d, lr %g", name, len(examples),
                params.epochs, total_steps, params.batch_size, params.lr)
    for epoch in range(params.epochs):
        loss_sum, loss_tokens = 0.0, 0
        for batch in batches(examples, params.batch_size, generator, pad_id):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = causal_lm_loss(logits, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if params.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()  # per optimiser step, not per epoch
            n_lab = int(batch.loss_mask[:, 1:].sum())
            loss_sum += float(loss.detach()) * n_lab
            loss_tokens += n_lab
            n_tok = batch.n_tokens
            tokens += n_tok
            tok_log += n_tok
            step += 1
            if step % params.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                logger.info("%s: epoch %d step %d/%d loss %.4f lr %.2e %.0f tok/s", name, epoch + 1, step,
                            total_steps, float(loss.detach()), lrs[-1], tok_log / max(now - t_log, 1e-9))
                t_log, tok_log = now, 0
            if max_steps is not None and step >= max_steps:
                break
        epoch_losses.append(loss_sum / max(loss_tokens, 1))
        logger.info("%s: epoch %d mean loss %.4f", name, epoch + 1, epoch_losses[-1])
        if max_steps is not None and step >= max_steps:
            break
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainResult(step, seconds, tokens, tokens / max(seconds, 1e-9), epoch_losses, epoch_losses[-1], lrs)


def pretrain(model: nn.Module, tokenizer: Any, texts: Sequence[str], params: TrainParams,
             max_len: int) -> TrainResult:
    """Next-token pre-training of ``model`` (in place) on documents."""
    examples = encode_documents(tokenizer, texts, max_len)
    return train_causal_lm(model, examples, params, tokenizer.pad_token_id, name="pretrain")


def finetune(model: nn.Module, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str],
             params: TrainParams, max_len: int) -> TrainResult:
    """Full-parameter fine-tuning of ``model`` (in place) on QA pairs, loss on completions only."""
    examples = encode_pairs(tokenizer, prompts, completions, max_len)
    return train_causal_lm(model, examples, params, tokenizer.pad_token_id, name="finetune")


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Encoded, pad_id: int, batch_size: int = 64) -> float:
    """Mean next-token loss over the target tokens of ``examples``."""
    model.eval()
    total, n = 0.0, 0
    for batch in iter_batches(examples, batch_size, pad_id, sort_by_length=False):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total += float(causal_lm_loss(logits, batch, reduction="sum"))
        n += int(batch.loss_mask[:, 1:].sum())
    return total / max(n, 1)


@torch.no_grad()
def span_losses(model: nn.Module, tokenizer: Any, texts: Sequence[str],
                spans: Sequence[Sequence[tuple[int, int]]], batch_size: int = 64) -> list[list[float]]:
    """For each text, the summed next-token loss (nats) of the tokens overlapping each character span.

    Used to check how well pre-training memorised each document's stated facts (a value's loss near
    zero means an over-memorised document, SPEC section 7).
    """
    model.eval()
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out: list[list[float]] = []
    for i in range(0, len(texts), batch_size):
        ids = enc["input_ids"][i : i + batch_size]
        batch = collate(Encoded(ids, [[True] * len(x) for x in ids]), range(len(ids)), tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok_nll = -logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # loss of token t+1
        for row, k in enumerate(range(i, min(i + batch_size, len(texts)))):
            offsets = enc["offset_mapping"][k]
            res = []
            for a, b in spans[k]:
                toks = [t for t, (s, e) in enumerate(offsets) if s < b and e > a and t > 0]
                res.append(float(sum(tok_nll[row, t - 1] for t in toks)))
            out.append(res)
    return out


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 6,
                    batch_size: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens skipped).

    Prompts are grouped by token length so no padding is needed (exact, deterministic).
    """
    model.eval()
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    out: list[str] = [""] * len(prompts)
    for idx in by_len.values():
        for j in range(0, len(idx), batch_size):
            chunk = idx[j : j + batch_size]
            seq = torch.tensor([ids[i] for i in chunk], dtype=torch.long)
            start = seq.size(1)
            for _ in range(max_new_tokens):
                logits = model(input_ids=seq).logits[:, -1, :]
                seq = torch.cat([seq, logits.argmax(dim=-1, keepdim=True)], dim=1)
            for row, i in enumerate(chunk):
                out[i] = tokenizer.decode(seq[row, start:].tolist(), skip_special_tokens=True)
    return out


def first_word(text: str) -> str:
    """The first whitespace-delimited word of ``text``, stripped of surrounding punctuation."""
    parts = text.strip().split()
    return parts[0].strip(".,;:!?\"'()") if parts else ""


def answer_accuracy(model: nn.Module, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str],
                    max_new_tokens: int = 6) -> tuple[float, list[str]]:
    """Fraction of prompts whose greedy continuation's first word equals the completion's first word;
    also returns the generations."""
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    correct = [first_word(g) == first_word(c) for g, c in zip(gens, completions, strict=True)]
    return (sum(correct) / max(len(correct), 1)), gens


def block_linear_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights and biases of the linear layers inside the transformer blocks (not embeddings, not the
    output head), by parameter name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head:
            for p_name, p in mod.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}"] = p
    return out


@torch.no_grad()
def parameter_proximity(model_ft: nn.Module, model_pt: nn.Module) -> float:
    """‖θ_ft − θ_pt‖ / ‖θ_pt‖ over the transformer-block linear layers (SPEC section 6)."""
    ft, pt = block_linear_parameters(model_ft), block_linear_parameters(model_pt)
    if ft.keys() != pt.keys():
        raise ValueError("the models' block linear layers differ")
    diff = sum(float((ft[k].double() - pt[k].double()).pow(2).sum()) for k in pt)
    base = sum(float(pt[k].double().pow(2).sum()) for k in pt)
    return math.sqrt(diff) / math.sqrt(base)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set ``torch.set_num_threads(n)`` (no-op for ``None``)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (the fine-tuning stage starts from a copy of the pre-trained model)."""
    return copy.deepcopy(model)
