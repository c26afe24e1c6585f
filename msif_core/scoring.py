"""Candidate side: influence scores of documents for many queries at once (SPEC section 4).

Per batch of candidate documents: one forward and backward pass, then per module and block
``score = Σ_t ds_tᵀ Q̃ a_t`` for every query iHVP ``Q̃``. No candidate gradient is kept or
preconditioned. Two equivalent contractions are available, chosen per module by flop count:

- ``"gradient"``: form the batch's per-sequence gradients ``Σ_t ds_t a_tᵀ`` (the work a backward pass
  does for weight gradients, freed right after) and take their inner products with all ``Q̃``;
- ``"low_rank"``: with rank-r query iHVPs ``U Vᵀ``, ``Σ_t (ds_tᵀ U)(Vᵀ a_t)``, never forming a gradient.

Dense query iHVPs are laid out once per call; rank-r ones are expanded one module and a slice of
queries at a time, only when that module's group of gradients is scored, and freed at once: memory then
holds the low-rank factors and one slice's expansion of one module, never every module's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import Encoded, iter_batches
from .ekfac import compute_dtype
from .gradients import analysed_grads_only, forward_backward
from .models import ModuleSpec
from .query import QUERY_SLICE, QueryIHVPs

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """Scores [documents, queries] (positive = the document supports the completion), per block too.

    ``timings``: ``setup_s`` (once per call: laying out the query iHVPs), ``seconds`` and ``docs_per_s``
    (the pass over the documents), ``documents``, ``tokens``.
    """

    scores: np.ndarray  # [N, Q]
    by_block: np.ndarray  # [N, blocks, Q]
    block_names: list[str]
    block_kinds: list[str]
    losses: np.ndarray  # [N] each document's summed loss
    timings: dict = field(default_factory=dict)

    def part(self, kind: str) -> np.ndarray:
        """Sum of the per-block scores of ``kind`` ("mlp" or "mha"), [N, Q]."""
        sel = np.array([k == kind for k in self.block_kinds])
        return self.by_block[:, sel, :].sum(axis=1) if sel.any() else np.zeros_like(self.scores)


def _costs(spec: ModuleSpec, t: int, q: int, r: int, shared_v: bool = False,
           group_rows: int = 1) -> tuple[float, float]:
    """Flops per document of the gradient route (form the gradient, its products with the queries, and, for
    rank-r iHVPs, their expansion, done once per group of ``group_rows`` documents) and of the low-rank
    token route."""
    pd_ = spec.out_features * spec.d
    dense = t * pd_ + q * pd_ + (q * pd_ * r / max(group_rows, 1) if r else 0)
    low = t * q * r * (spec.out_features + (1 if shared_v else spec.n_blocks) * spec.d) if r else float("inf")
    return dense, low


def score_documents(model: nn.Module, ihvps: QueryIHVPs, encoded: Encoded, batch_size: int = 8,
                    pad_id: int | None = None, strategy: str = "auto", group_mib: float = 4096) -> ScoreResult:
    """Score every document in ``encoded`` against every query iHVP in ``ihvps``.

    ``model`` is θ_pt for MS-IF and GDP, θ_ft for SS-IF. The document loss is its summed next-token
    cross-entropy over its own tokens. Results are in the order of ``encoded``. A half-precision model's
    captures are scored in float32 (gradients, products and sums), as its iHVPs are kept.

    With the ``"gradient"`` contraction, the per-sequence gradients of successive batches are grouped
    (about one sequence per query, at most ``group_mib`` MiB) before their product with the query
    iHVPs, so that the iHVPs, read once per group, are not re-read for every small batch: many queries
    then cost little more than one.
    """
    if strategy not in ("auto", "gradient", "low_rank"):
        raise ValueError(f"strategy must be auto, gradient or low_rank, got {strategy!r}")
    if strategy == "low_rank" and ihvps.rank == 0:
        raise ValueError("the low_rank strategy needs rank-r query iHVPs (rank > 0)")
    if len(encoded) == 0:
        raise ValueError("no documents to score")
    t_start = time.perf_counter()
    specs = list(ihvps.specs.values())
    dev = next(model.parameters()).device
    dtype = compute_dtype(next(model.parameters()).dtype)  # half-precision models: products and sums in float32
    pad = pad_id if pad_id is not None else int(getattr(model.config, "pad_token_id", None) or 0)
    nq, n = ihvps.n_queries, len(encoded)
    blocks = [b for s in specs for b in s.blocks]
    first_col = dict(zip([s.name for s in specs], np.cumsum([0] + [s.n_blocks for s in specs]).tolist()))
    by_block = torch.zeros(n, len(blocks), nq, dtype=torch.float64)
    losses = torch.zeros(n, dtype=torch.float64)
    # per block, the queries' iHVPs as rows: [n, Q, p·d], so that scoring a group is one matrix product;
    # laid out now for dense iHVPs, at each flush for low-rank ones (one module's expansion at a time)
    dense = {s.name: ihvps.block_rows(s.name, dev, dtype) for s in specs if s.name in ihvps.dense}
    uv = {s.name: (ihvps.u[s.name].to(dev, dtype), ihvps.v[s.name].to(dev, dtype))
          for s in specs if s.name in ihvps.u}
    seq_bytes = sum(s.out_features * s.d for s in specs) * torch.finfo(dtype).bits // 8
    # a group as large as the number of queries (reading the iHVPs then costs about what writing the
    # group's gradients does), within the memory budget, in whole batches (an overflowing batch flushes first)
    budget_rows = int(group_mib * 2**20 // seq_bytes) // batch_size * batch_size
    group_rows = min(n, max(batch_size, min(-(-nq // batch_size) * batch_size, budget_rows)))
    # per module, a buffer of per-sequence gradients [group, n, p·d] that batches write into; a full buffer
    # is scored with one product against the iHVPs (read once per group, not once per batch)
    bufs: dict[str, torch.Tensor] = {}
    held: dict[str, list[torch.Tensor]] = {}  # per module, the document rows in its buffer, in order
    filled: dict[str, int] = {}  # per module, how many rows of its buffer hold gradients

    def flush(name: str) -> None:
        rows, k = held.pop(name, []), filled.pop(name, 0)
        if not k:
            return
        g = bufs[name][:k].permute(1, 2, 0)  # [n, p·d, k]
        col, n_blocks = first_col[name], ihvps.specs[name].n_blocks
        idx = torch.cat(rows)
        if name in dense:
            sc = torch.matmul(dense[name], g)  # [n, Q, k]
            by_block[idx, col:col + n_blocks] = sc.permute(2, 0, 1).double().cpu()
            return
        for lo in range(0, nq, QUERY_SLICE):  # rank r: expand a slice of queries at a time, then free it
            sl = slice(lo, min(lo + QUERY_SLICE, nq))
            sc = torch.matmul(ihvps.block_rows(name, dev, dtype, sl), g)  # [n, q, k]
            by_block[idx, col:col + n_blocks, sl] = sc.permute(2, 0, 1).double().cpu()

    def add(name: str, rows: torch.Tensor, ds: torch.Tensor, a: torch.Tensor) -> None:
        s = ihvps.specs[name]
        b = len(rows)
        if filled.get(name, 0) + b > group_rows:
            flush(name)
        if name not in bufs or bufs[name].shape[0] < b:
            bufs[name] = torch.empty(max(group_rows, b), s.n_blocks, s.p * s.d, dtype=a.dtype, device=a.device)
        at = filled.get(name, 0)
        torch.matmul(ds.transpose(1, 2), a, out=bufs[name][at:at + b].view(b, s.out_features, s.d))
        held.setdefault(name, []).append(rows)
        filled[name] = at + b

    t0 = time.perf_counter()
    setup_s = t0 - t_start
    done = tokens = 0
    last = t0
    with analysed_grads_only(model, specs):
        for batch in iter_batches(encoded, batch_size, pad):
            batch = batch.to(dev)
            cap = forward_backward(model, specs, batch, fisher="empirical")
            b, t = batch.input_ids.shape
            rows = torch.tensor(batch.index)
            for s in specs:
                a, ds = cap.a[s.name].to(dtype), cap.ds[s.name].to(dtype)
                shared = s.name in uv and uv[s.name][1].shape[1] == 1
                r_eff = int(uv[s.name][0].shape[-1]) if s.name in uv else 0  # min(r, P, d) as stored
                c_dense, c_low = _costs(s, t, nq, r_eff, shared, group_rows)
                use_low = s.name in uv and (strategy == "low_rank" or (strategy == "auto" and c_low < c_dense))
                if use_low:
                    col = first_col[s.name]
                    dsb = ds.view(b, t, s.n_blocks, s.p)
                    for lo in range(0, nq, QUERY_SLICE):  # a slice of queries at a time: [B, n, q, r, T] bounded
                        sl = slice(lo, min(lo + QUERY_SLICE, nq))
                        u, v = uv[s.name][0][sl], uv[s.name][1][sl]  # [q, n, p, r], [q, n or 1, d, r]
                        x = torch.einsum("btnp,qnpr->bnqrt", dsb, u)
                        y = (torch.einsum("btd,qdr->bqrt", a, v[:, 0]).unsqueeze(1) if shared  # one V per module
                             else torch.einsum("btd,qndr->bnqrt", a, v))
                        by_block[rows, col:col + s.n_blocks, sl] = (x * y).sum(dim=(-1, -2)).double().cpu()
                        del x, y
                else:  # the batch's per-sequence gradients, scored with the group
                    add(s.name, rows, ds, a)
            losses[rows] = cap.per_sequence_loss.double().cpu()
            del cap
            done += b
            tokens += batch.n_tokens
            now = time.perf_counter()
            if now - last > 10 or done == n:
                log.info("scored %d/%d documents x %d queries, %.1f docs/s", done, n, nq, done / (now - t0))
                last = now
        for name in list(held):
            flush(name)
    secs = time.perf_counter() - t0
    bb = by_block.numpy()
    return ScoreResult(bb.sum(axis=1), bb, [b.name for b in blocks], [b.kind for b in blocks], losses.numpy(),
                       {"setup_s": setup_s, "seconds": secs, "documents": n, "tokens": tokens,
                        "docs_per_s": n / max(secs, 1e-9)})
