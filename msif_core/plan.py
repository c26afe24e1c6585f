"""The memory plan: how many queries are preconditioned and scored together, and how many documents go
through the model at once, so that the whole process stays within a budget whatever the number of
queries (SPEC section 4's query side, in chunks).

The budget is the process's (what ``ru_maxrss`` reports), so the plan subtracts what is there anyway:

- resident: the runtime (Python, torch: :data:`RUNTIME_BYTES`) and the models' parameters, as the
  caller holds them (:func:`model_bytes`);
- the larger of the two phases' temporaries, which never coexist:
  * query side: a slice of :data:`~msif_core.query.QUERY_SLICE` queries' measurement gradients and
    preconditioning temporaries (three of the largest module's P·d each), and the factors of the modules
    being preconditioned (read module by module, ``Factors.load(lazy=True)``: two modules per stage and
    their bases' products);
  * scoring: one batch of documents through the model (its activations and captured a, ds:
    :data:`ACTIVATION_FACTOR` × Σ(P + d) per token, and the logits), the group of candidate gradients
    scored together (at least the batch's; up to :data:`GROUP_SHARE` of the budget, and whatever the
    chunk's iHVPs leave) and, at rank r, a slice's expansion of the largest module.

What is left holds the chunk's query iHVPs (per query: P·d per module exact, with a copy in the scoring
layout for modules of several blocks; (P + d)·r per module at module rank r): the chunk size is how many
fit, and each chunk is one pass over its candidates. The document batch is the configured one, halved
until a batch's temporaries take at most :data:`BATCH_SHARE` of the budget.

The plan fills :data:`PLANNED_SHARE` of the budget (the rest is for what its estimates miss). The budget
defaults to half the memory available on the device (:func:`msif_core.memory.available_memory`)
when the plan is made, at most 64 GiB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .memory import available_memory
from .models import ModuleSpec
from .query import QUERY_SLICE, low_rank_numbers

GIB = 2**30
AUTO_SHARE = 0.5
AUTO_MAX = 64 * GIB
GROUP_SHARE = 0.125  # of the budget, at most, for the group of candidate gradients scored together
BATCH_SHARE = 0.25  # of the budget, at most, for one batch of documents' activations and gradients
# calibrated with bench/plan_calibration.py (ru_maxrss of one forward+backward, Pythia-160M shape, CPU)
RUNTIME_BYTES = int(0.6 * GIB)  # measured 0.3 GiB with torch alone; room for transformers, pandas, Dagster
ACTIVATION_FACTOR = 2.5  # a batch's activations per token, in units of its captured Σ(P + d)
LOGIT_COPIES = 3  # logits, their log-softmax and its gradient, float32
PLANNED_SHARE = 0.92  # of the budget the plan fills: the rest for what its estimates miss (allocator, Python)


class MemoryBudgetError(ValueError):
    """The budget cannot hold one query and one document."""


@dataclass(frozen=True)
class MemoryPlan:
    """Query chunks and document batches within a memory budget."""

    budget_bytes: int
    bytes_per_query: int
    fixed_bytes: int  # the larger phase's temporaries (query slice and factors, or a batch and its group)
    group_bytes: int  # candidate gradients scored together
    queries: int
    queries_per_chunk: int
    resident_bytes: int = 0  # runtime and models
    batch_size: int = 8  # documents per forward/backward pass while scoring

    @property
    def chunks(self) -> int:
        """Number of query chunks (= passes over the candidates per method)."""
        return max(1, math.ceil(self.queries / self.queries_per_chunk)) if self.queries else 0

    @property
    def group_mib(self) -> float:
        """The group budget in MiB (``score_documents(group_mib=...)``)."""
        return self.group_bytes / 2**20

    def ranges(self) -> list[range]:
        """The query positions of each chunk, in order."""
        k = self.queries_per_chunk
        return [range(i, min(i + k, self.queries)) for i in range(0, self.queries, k)]

    def as_dict(self) -> dict:
        """For logs and asset metadata."""
        return asdict(self) | {"chunks": self.chunks, "budget_gib": round(self.budget_bytes / GIB, 3),
                               "mib_per_query": round(self.bytes_per_query / 2**20, 2)}

    def describe(self) -> str:
        """One line for the log."""
        return (f"memory plan: {self.queries} queries in {self.chunks} chunk(s) of ≤ {self.queries_per_chunk} "
                f"({self.bytes_per_query / 2**20:.1f} MiB per query, budget {self.budget_bytes / GIB:.2f} GiB: "
                f"{self.resident_bytes / GIB:.2f} runtime and models, {self.fixed_bytes / GIB:.2f} temporaries; "
                f"documents {self.batch_size} per batch, candidate groups {self.group_mib:.0f} MiB)")


def budget_bytes(memory_gib: float | None, device: torch.device | str = "cpu") -> int:
    """``memory_gib`` in bytes, or (None) half the memory available on ``device``, at most 64 GiB (4 GiB where
    it cannot be read)."""
    if memory_gib is not None:
        if not memory_gib > 0:
            raise ValueError(f"memory_gib must be > 0 (or None for automatic), got {memory_gib}")
        return int(memory_gib * GIB)
    avail = available_memory(torch.device(device))
    return 4 * GIB if avail is None else int(min(avail * AUTO_SHARE, AUTO_MAX))


def model_bytes(*models: torch.nn.Module | None, device: torch.device | str | None = None) -> int:
    """Parameter and buffer bytes of the distinct ``models`` (None and repeats skipped) that lie on
    ``device``'s kind of memory (default: each model's first parameter's): the budget is that device's."""
    seen, total = set(), 0
    for m in models:
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        tensors = (*m.parameters(), *m.buffers())
        kind = torch.device(device).type if device is not None else (tensors[0].device.type if tensors else "cpu")
        total += sum(t.numel() * t.element_size() for t in tensors if t.device.type == kind)
    return total


def vocab_size(model: torch.nn.Module | None) -> int:
    """Width of the model's output layer (its logits per token), 0 where it has none we can find."""
    head = model.get_output_embeddings() if model is not None and hasattr(model, "get_output_embeddings") else None
    return int(getattr(head, "out_features", 0) or 0) if head is not None else 0


def compute_itemsize(dtype: torch.dtype) -> int:
    """Bytes per number of what msif computes and keeps for a model of ``dtype``
    (:func:`msif_core.ekfac.compute_dtype`: float32 for half-precision models)."""
    from .ekfac import compute_dtype

    return torch.finfo(compute_dtype(dtype)).bits // 8


def query_bytes(specs: list[ModuleSpec], rank: int, query_tokens: int, itemsize: int) -> int:
    """Bytes one query adds to a chunk: see the module docstring (``query_tokens`` is not needed here: a
    query's measurement gradients are fixed costs, :func:`fixed_bytes`)."""
    per = 0
    for s in specs:
        pd = s.out_features * s.d
        low = low_rank_numbers(s, rank) if rank else pd
        per += min(pd, low)  # iHVPs (a module where rank r is not smaller stays exact)
        if low >= pd and s.n_blocks > 1:
            per += pd  # the row layout of a multi-block module is a copy
    return per * itemsize


def fixed_bytes(specs: list[ModuleSpec], itemsize: int, query_tokens: int = 64) -> int:
    """Bytes of the query side whatever the chunk size: a slice of queries' measurement gradients (per module
    the smaller of T·(P + d) tokens and P·d), preconditioning temporaries (three of the largest module's P·d
    each) and the factors in use (two modules of each stage, and the product of their bases)."""
    from .ekfac import module_floats
    from .query import QUERY_SLICE

    largest = max(s.out_features * s.d for s in specs)
    grads = sum(min(query_tokens * (s.out_features + s.d), s.out_features * s.d) for s in specs)
    factors = 5 * max(module_floats(s) for s in specs)
    return (QUERY_SLICE * (grads + 3 * largest) + factors) * itemsize


def batch_bytes(specs: list[ModuleSpec], doc_tokens: int, dtype: torch.dtype, vocab: int = 0) -> int:
    """Bytes one document of ``doc_tokens`` takes while it is scored: its activations and captures in the
    model (:data:`ACTIVATION_FACTOR` × Σ(P + d) per token in the model's dtype, and the logits in float32)
    and its row of per-sequence gradients in the group."""
    model_item = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    per_token = ACTIVATION_FACTOR * sum(s.out_features + s.d for s in specs) * model_item + LOGIT_COPIES * vocab * 4
    return int(doc_tokens * per_token) + sum(s.out_features * s.d for s in specs) * compute_itemsize(dtype)


def plan_memory(specs: list[ModuleSpec], queries: int, rank: int = 0, query_tokens: int = 64,
                dtype: torch.dtype = torch.float32, memory_gib: float | None = None,
                device: torch.device | str = "cpu", doc_tokens: int = 512, resident_bytes: int | None = None,
                batch_size: int = 8, vocab: int = 0) -> MemoryPlan:
    """The chunks of ``queries`` and the document batch that fit the budget (module docstring);
    ``resident_bytes``: the models the caller holds (:func:`model_bytes`; None: :data:`RUNTIME_BYTES` only,
    added to it otherwise). A :class:`MemoryBudgetError` naming the budget, what one query needs and the
    fixes when not even one query and one document fit."""
    budget = budget_bytes(memory_gib, device)
    itemsize = compute_itemsize(dtype)
    per = query_bytes(specs, rank, query_tokens, itemsize)
    resident = RUNTIME_BYTES + (resident_bytes or 0)
    one_doc = batch_bytes(specs, doc_tokens, dtype, vocab)
    row = sum(s.out_features * s.d for s in specs) * itemsize  # one candidate's gradients, all modules
    batch = max(1, batch_size)
    while batch > 1 and batch * one_doc > BATCH_SHARE * budget:
        batch //= 2
    expand = QUERY_SLICE * max(s.out_features * s.d for s in specs) * itemsize if rank else 0
    group = max(batch * row, min(int(budget * GROUP_SHARE), max(queries, 1) * row))
    score_temp = batch * one_doc + (group - batch * row) + expand
    temp = max(fixed_bytes(specs, itemsize, query_tokens), score_temp)
    room = int(budget * PLANNED_SHARE) - resident - temp
    if room < per:
        raise MemoryBudgetError(
            f"the memory budget of {budget / GIB:.2f} GiB cannot hold one query and one document: one query needs "
            f"{per / GIB:.2f} GiB (its iHVPs over {len(specs)} modules, rank {rank or 'exact'}) beside "
            f"{resident / GIB:.2f} GiB of runtime and models and {temp / GIB:.2f} GiB of temporaries (a slice of "
            f"queries' gradients, or {batch} document(s) of {doc_tokens} tokens and their gradients). Fix: raise "
            f"memory_gib ([scores] memory_gib, AttributionSettings(memory_gib=...)), set query_rank (e.g. 32: "
            f"rank-r iHVPs take (P + d)·r per module), lower max_length, or analyse fewer modules "
            f"(modules = \"mlp\")")
    k = max(1, min(queries, room // per)) if queries else 1
    # what the chunk leaves goes to the candidate group (up to a row per query): a group of k documents
    # expands rank-r iHVPs once per k documents, and reads dense ones once per k
    free = (room - k * per) + (temp - score_temp)  # unused by the chunk, and by scoring within the query side's
    extra = max(0, min(max(queries, 1) * row - group, free))
    group += extra
    temp = max(temp, score_temp + extra)
    return MemoryPlan(budget, per, temp, group, queries, int(k), resident, batch)


def budget_for(specs: list[ModuleSpec], queries_per_chunk: int, **plan_args) -> float:
    """The smallest memory_gib (within 1e-6 of it) whose plan puts ``queries_per_chunk`` queries (or all of
    them, if fewer) in a chunk, for tests and benchmarks that want a number of chunks; ``plan_args`` as
    :func:`plan_memory`'s, ``queries`` included."""
    want = max(1, min(int(queries_per_chunk), int(plan_args.get("queries", 1))))
    lo, hi = 1e-4, 1e-2
    while _per_chunk(specs, hi, plan_args) < want:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-7 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _per_chunk(specs, mid, plan_args) < want else (lo, mid)
    return hi * (1 + 1e-6)


def _per_chunk(specs: list[ModuleSpec], gib: float, plan_args: dict) -> int:
    try:
        return plan_memory(specs, memory_gib=gib, **plan_args).queries_per_chunk
    except MemoryBudgetError:
        return 0
