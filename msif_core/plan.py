"""The memory plan: how many queries are preconditioned and scored together so that memory stays within
a budget whatever the number of queries (SPEC section 4's query side, in chunks).

Per query, one chunk holds its query iHVPs (P·d per module exact, with a copy in the
scoring layout for modules of several blocks; (P + d)·r per module at module rank r). Fixed: the
measurement gradients of a slice of 16 queries (they are preconditioned slice by slice and dropped), the
temporaries of preconditioning such a slice of the largest module (and at rank r its
expansion while scoring), one candidate's captured tokens, and a group of candidate gradients scored
together (a quarter of the budget, at least one document's). The chunk size is the largest number of
queries whose share fits in what the budget
leaves after the group; each chunk is then one pass over the candidates (:func:`plan_memory`).

The budget defaults to half the memory available on the device (:func:`msif_core.memory.available_memory`)
when the plan is made, at most 64 GiB; the model itself and one batch's activations are outside it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .memory import available_memory
from .models import ModuleSpec
from .query import low_rank_numbers

GIB = 2**30
AUTO_SHARE = 0.5
AUTO_MAX = 64 * GIB
GROUP_SHARE = 0.25  # of the budget, for the group of candidate gradients scored together


class MemoryBudgetError(ValueError):
    """The budget cannot hold one query and one document."""


@dataclass(frozen=True)
class MemoryPlan:
    """Query chunks within a memory budget."""

    budget_bytes: int
    bytes_per_query: int
    fixed_bytes: int  # one candidate's captured tokens and the slice temporaries, whatever the chunk size
    group_bytes: int  # candidate gradients scored together
    queries: int
    queries_per_chunk: int

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
                f"({self.bytes_per_query / 2**20:.1f} MiB per query, budget {self.budget_bytes / GIB:.2f} GiB, "
                f"candidate groups {self.group_mib:.0f} MiB)")


def budget_bytes(memory_gib: float | None, device: torch.device | str = "cpu") -> int:
    """``memory_gib`` in bytes, or (None) half the memory available on ``device``, at most 64 GiB (4 GiB where
    it cannot be read)."""
    if memory_gib is not None:
        if not memory_gib > 0:
            raise ValueError(f"memory_gib must be > 0 (or None for automatic), got {memory_gib}")
        return int(memory_gib * GIB)
    avail = available_memory(torch.device(device))
    return 4 * GIB if avail is None else int(min(avail * AUTO_SHARE, AUTO_MAX))


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


def fixed_bytes(specs: list[ModuleSpec], rank: int, itemsize: int, query_tokens: int = 64) -> int:
    """Bytes a chunk needs whatever its size: a slice of queries' measurement gradients (per module the
    smaller of T·(P + d) tokens and P·d) and preconditioning temporaries (three of the largest module's
    P·d each) and, at rank r, a slice's expansion of the largest module while scoring."""
    from .query import QUERY_SLICE

    largest = max(s.out_features * s.d for s in specs)
    grads = sum(min(query_tokens * (s.out_features + s.d), s.out_features * s.d) for s in specs)
    return QUERY_SLICE * (grads + largest * (3 + (1 if rank else 0))) * itemsize


def plan_memory(specs: list[ModuleSpec], queries: int, rank: int = 0, query_tokens: int = 64,
                dtype: torch.dtype = torch.float32, memory_gib: float | None = None,
                device: torch.device | str = "cpu", doc_tokens: int = 512) -> MemoryPlan:
    """The chunks of ``queries`` that fit the budget; a :class:`MemoryBudgetError` naming the budget, what one
    query needs and the fixes when not even one query and one document fit."""
    budget = budget_bytes(memory_gib, device)
    itemsize = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    per = query_bytes(specs, rank, query_tokens, itemsize)
    one_doc = sum(s.out_features * s.d for s in specs) * itemsize  # one candidate's gradients, all modules
    tokens = doc_tokens * sum(s.out_features + s.d for s in specs) * itemsize  # its captured a and ds
    tokens += fixed_bytes(specs, rank, itemsize, query_tokens)
    group = max(one_doc, min(int(budget * GROUP_SHARE), budget - per - tokens))
    room = budget - group - tokens
    if room < per:
        raise MemoryBudgetError(
            f"the memory budget of {budget / GIB:.2f} GiB cannot hold one query and one document: one query needs "
            f"{per / GIB:.2f} GiB (its measurement gradients and iHVPs over {len(specs)} modules, rank "
            f"{rank or 'exact'}) and one document {(one_doc + tokens) / GIB:.2f} GiB. Fix: raise memory_gib "
            f"([scores] memory_gib, AttributionSettings(memory_gib=...)), set query_rank (e.g. 32: rank-r iHVPs "
            f"take (P + d)·r per module), or analyse fewer modules (modules = \"mlp\")")
    k = max(1, min(queries, room // per)) if queries else 1
    return MemoryPlan(budget, per, tokens, group, queries, int(k))
