"""The pre-training influence index: MS-IF's document side computed once per pre-trained model.

In MS-IF = ∇m(x; θ_ft)ᵀ P_ft P_pt ∇ℓ(z; θ_pt) the document side, P_pt and ∇ℓ(z; θ_pt), never depends on
the fine-tune. With the pre-train EK-FAC eigenbasis each block's P_pt = W Wᵀ, W = Q (Λ_pt + λ_pt)^(-1/2)
(elementwise in the eigenbasis), so

    MS-IF(x, z) = ⟨Wᵀ P_ft ∇m(x), Wᵀ ∇ℓ(z)⟩ ≈ ⟨ψ(x), φ(z)⟩,   φ(z) = Π Wᵀ ∇ℓ(z),   ψ(x) = Π Wᵀ P_ft ∇m(x),

with Π a fixed, seeded random projection to about ``dimensions`` numbers (:class:`Projection`: per block
the Kronecker product R_S ⊗ R_A of two Gaussian matrices, applied as ``R_S X R_Aᵀ``; E[ΠᵀΠ] = I, so the
projected inner product is unbiased). A document's vector φ is computed once per pre-trained model
(:func:`document_vectors`); a new fine-tune or a new query only computes ψ (:func:`query_vectors`) and
inner products (:func:`search`).

Two ways of splitting P_pt (``whiten``):

- whitened (default): both sides carry (Λ_pt + λ)^(-1/2), which balances their norms, so the projection's
  relative error is smallest; the index depends on λ_pt;
- plain: φ = Π Q_ptᵀ ∇ℓ Q_pt (the rotated gradient), ψ = Π Q_ptᵀ P_pt P_ft ∇m Q_pt (all of P_pt on the
  query side); λ_pt does not enter the index.

The same index also answers the gradient dot product (``gdp_index``; :func:`query_vectors` with
``method="gdp"``): a query vector Π W⁻¹ ∇m against φ gives ∇mᵀ∇ℓ, with no fine-tune factors and no
second pass over the corpus.

Without projection (``dimensions=None``) ⟨ψ, φ⟩ is exactly MS-IF (or GDP), which the tests check against
explicit preconditioning. Vector columns run module by module, block by block (``Projection.columns``),
so the MLP and attention shares of an index score are sums over column ranges.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import Encoded, iter_batches
from .ekfac import Factors, compute_dtype
from .gradients import analysed_grads_only, forward_backward
from .models import ModuleSpec
from .query import QUERY_SLICE, MeasurementGradients

log = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bump when the meaning of stored vectors changes


class IndexMismatchError(ValueError):
    """An index was built for another pre-trained model, projection or damping than the one asked for."""


@dataclass(frozen=True)
class BlockShape:
    """One module's projected block: R_S [k_s, p] per block (None: identity), R_A [k_a, d] (None: identity)."""

    k_s: int
    k_a: int
    identity_s: bool
    identity_a: bool


class Projection:
    """A seeded random projection Π of every analysed module's per-block [p, d] matrices to [k_s, k_a].

    ``dimensions`` (about the total length of a vector) is shared out over modules in proportion to
    their parameters (P·d); within a block, k_s : k_a follows p : d. A block whose share reaches p·d is
    kept whole (Π = identity there); ``dimensions=None`` keeps every block whole (the exact, unprojected
    index). R_S (one per block) and R_A (one per module: the blocks of a module share their input) have
    independent N(0, 1/k) entries drawn from a generator seeded by ``seed`` and the module's name, so the
    same seed gives the same Π for documents and queries, in any process.
    """

    def __init__(self, specs: Sequence[ModuleSpec], dimensions: int | None, seed: int = 0) -> None:
        if dimensions is not None and dimensions < 1:
            raise ValueError(f"index dimensions must be a positive number (or None: unprojected), got {dimensions}")
        self.specs = {s.name: s for s in specs}
        self.requested, self.seed = dimensions, int(seed)
        total = sum(s.out_features * s.d for s in specs)
        self.shapes: dict[str, BlockShape] = {}
        for s in specs:
            if dimensions is None or dimensions >= total:
                self.shapes[s.name] = BlockShape(s.p, s.d, True, True)
                continue
            per_block = max(1.0, dimensions * s.out_features * s.d / total / s.n_blocks)
            k_s = min(s.p, max(1, round(math.sqrt(per_block * s.p / s.d))))
            k_a = min(s.d, max(1, round(per_block / k_s)))
            self.shapes[s.name] = BlockShape(k_s, k_a, k_s == s.p, k_a == s.d)
        self.widths = {n: self.specs[n].n_blocks * b.k_s * b.k_a for n, b in self.shapes.items()}
        starts = np.cumsum([0] + list(self.widths.values())).tolist()
        self._start = dict(zip(self.widths, starts))
        self.dimensions = int(starts[-1])
        self._cache: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def columns(self, name: str) -> slice:
        """The columns of module ``name`` in a vector (its blocks one after another, k_s·k_a each)."""
        return slice(self._start[name], self._start[name] + self.widths[name])

    def block_columns(self) -> list[tuple[str, int, slice]]:
        """(module, block index, columns) of every block, in vector order."""
        out = []
        for name, b in self.shapes.items():
            lo, w = self._start[name], b.k_s * b.k_a
            out += [(name, j, slice(lo + j * w, lo + (j + 1) * w)) for j in range(self.specs[name].n_blocks)]
        return out

    def matrices(self, name: str, device: torch.device | str, dtype: torch.dtype
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(R_S [blocks, k_s, p] or None, R_A [k_a, d] or None) of module ``name`` (None: identity)."""
        key = (name, str(device), dtype)
        if key not in self._cache:
            s, b = self.specs[name], self.shapes[name]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            r_s = None if b.identity_s else torch.randn(s.n_blocks, b.k_s, s.p, generator=g, dtype=torch.float64)
            r_a = None if b.identity_a else torch.randn(b.k_a, s.d, generator=g, dtype=torch.float64)
            self._cache[key] = (None if r_s is None else (r_s / math.sqrt(b.k_s)).to(device, dtype),
                                None if r_a is None else (r_a / math.sqrt(b.k_a)).to(device, dtype))
        return self._cache[key]

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Π of per-block matrices ``x`` [m, blocks, p, d] of module ``name``: [m, its width]."""
        r_s, r_a = self.matrices(name, x.device, x.dtype)
        if r_s is not None:
            x = torch.matmul(r_s, x)  # [m, n, k_s, d]
        if r_a is not None:
            x = x @ r_a.transpose(0, 1)  # [m, n, k_s, k_a]
        return x.reshape(x.shape[0], -1)

    def manifest(self) -> dict:
        """What identifies this projection: seed, requested and actual dimensions, per-module shapes."""
        return {"seed": self.seed, "dimensions_requested": self.requested, "dimensions": self.dimensions,
                "shapes": {n: [b.k_s, b.k_a] for n, b in self.shapes.items()}}


def index_manifest(pt_factors: Factors, projection: Projection, damping_pt: float | str, whiten: bool,
                   pretrained: str = "") -> dict:
    """The manifest an index is built under and checked against (:func:`check_manifest`): the pre-trained
    model's fingerprint (``pretrained``, default the factors' own), the factors (when they were fitted, on
    how many sequences), the projection, the damping (whitened only)."""
    m = pt_factors.manifest
    return {"format": INDEX_FORMAT, "pretrained": pretrained or str(m.get("fingerprint", "")),
            "factors": f"{m.get('created', '')}, {m.get('sequences', '')} sequences",
            "whiten": bool(whiten), "damping_pt": str(damping_pt) if whiten else None} | projection.manifest()


def check_manifest(found: dict, expected: dict, where: str) -> None:
    """Raise :class:`IndexMismatchError` naming every field in which an index's manifest (read from
    ``where``) differs from what the query side expects; the fix is to rebuild the index."""
    keys = ("format", "pretrained", "factors", "whiten", "damping_pt", "seed", "dimensions", "shapes")
    diff = [k for k in keys if found.get(k) != expected.get(k)]
    if diff:
        said = "; ".join(f"{k}: index has {found.get(k)!r}, expected {expected.get(k)!r}" for k in diff
                         if k != "shapes") or "per-module projection shapes differ"
        raise IndexMismatchError(f"{where} was built for another setting ({said}). Rebuild the index for the "
                                 "current pre-trained model and [index] settings (msif run rebuilds it), or "
                                 "point the query side at the index it was built for")


def _rotated(pt_factors: Factors, s: ModuleSpec, ds: torch.Tensor, a: torch.Tensor, damping: float | str,
             whiten: bool) -> torch.Tensor:
    """Wᵀ G (whiten) or Q_Sᵀ G Q_A (plain) per block of each sequence's gradient G = Σ_t ds_t a_tᵀ;
    [B, blocks, p, d] in the factors' eigenbasis."""
    rot, _, _ = pt_factors.in_eigenbasis(s.name, damping, tokens=(ds, a), power=0.5 if whiten else 0.0)
    return rot


@dataclass
class DocumentVectors:
    """Index vectors of documents, in the order they were given, with what the same pass learns exactly."""

    vectors: np.ndarray  # [N, dimensions] φ(z)
    losses: np.ndarray  # [N] each document's summed next-token loss on θ_pt
    sq_norms: np.ndarray  # [N] ‖Wᵀ∇ℓ‖² = ∇ℓᵀ P_pt ∇ℓ (whitened: the self-influence) or ‖∇ℓ‖² (plain), unprojected


def _rotated_batches(model: nn.Module, specs: Sequence[ModuleSpec], encoded: Encoded, pt_factors: Factors,
                     damping_pt: float | str, whiten: bool, batch_size: int, pad_id: int | None, what: str):
    """Yields (rows, losses, module name, rot) per batch of ``encoded`` and module: rot [B, blocks, p, d] is
    Wᵀ G (whiten) or Q_Sᵀ G Q_A of the batch's per-sequence gradients G on θ_pt. Every batch reads every
    module's factors: pass factors held in memory (``Factors.load(lazy=False)``), not lazily read ones."""
    dev = next(model.parameters()).device
    dtype = compute_dtype(next(model.parameters()).dtype)
    pad = pad_id if pad_id is not None else int(getattr(model.config, "pad_token_id", None) or 0)
    n = len(encoded)
    t0 = last = time.perf_counter()
    done = 0
    with analysed_grads_only(model, specs):
        for batch in iter_batches(encoded, batch_size, pad):
            cap = forward_backward(model, specs, batch.to(dev), fisher="empirical")
            rows = np.asarray(batch.index)
            losses = cap.per_sequence_loss.double().cpu().numpy()
            for s in specs:
                yield rows, losses, s.name, _rotated(pt_factors, s, cap.ds[s.name].to(dtype), cap.a[s.name].to(dtype),
                                                     damping_pt, whiten)
            done += len(rows)
            del cap
            now = time.perf_counter()
            if now - last > 10 or done == n:
                log.info("%s: %d/%d documents, %.1f docs/s", what, done, n, done / max(now - t0, 1e-9))
                last = now


def document_vectors(model: nn.Module, specs: Sequence[ModuleSpec], encoded: Encoded, pt_factors: Factors,
                     projection: Projection, damping_pt: float | str = 1e-4, whiten: bool = True,
                     batch_size: int = 8, pad_id: int | None = None,
                     out_dtype: torch.dtype = torch.float32) -> DocumentVectors:
    """Index vectors φ(z) [N, dimensions] of the documents in ``encoded`` (in its order) on θ_pt
    (``model``), their losses and the exact squared norms of the unprojected vectors (cosine scores and
    self-influence without the projection's error). One forward and backward pass per batch; each
    module's per-sequence gradients are rotated into the pre-train eigenbasis (per token where that is
    cheaper), scaled by (Λ_pt + λ)^(-1/2) when whitened, and projected."""
    specs = [s for s in specs if s.name in pt_factors.specs]
    missing = [n for n in projection.specs if n not in {s.name for s in specs}]
    if missing:
        raise ValueError(f"the pre-train factors have no module {missing[0]}; the projection was made for "
                         "other modules: build it from the factors' modules")
    n = len(encoded)
    vecs = torch.zeros(n, projection.dimensions, dtype=out_dtype)
    losses, sq = np.zeros(n), np.zeros(n)
    for rows, loss, name, rot in _rotated_batches(model, specs, encoded, pt_factors, damping_pt, whiten, batch_size,
                                                  pad_id, "index vectors"):
        sq[rows] += (rot * rot).sum(dim=(1, 2, 3)).double().cpu().numpy()
        vecs[torch.from_numpy(rows), projection.columns(name)] = projection.apply(name, rot).to("cpu", out_dtype)
        losses[rows] = loss
    return DocumentVectors(vecs.numpy(), losses, sq)


@dataclass
class DocumentNorms:
    """Per document, the norms the normalised MS-IF methods divide by (``ms_if_unit``, ``ms_if_cosine``)."""

    grad_sq: np.ndarray  # [N] ‖∇ℓ(z; θ_pt)‖² over the analysed modules
    self_influence: np.ndarray  # [N] ∇ℓ(z)ᵀ P_pt ∇ℓ(z), the squared norm of the whitened gradient


def document_norms(model: nn.Module, specs: Sequence[ModuleSpec], encoded: Encoded, pt_factors: Factors,
                   damping_pt: float | str = 1e-4, batch_size: int = 8, pad_id: int | None = None) -> DocumentNorms:
    """Each document's squared gradient norm and self-influence on θ_pt, in the order of ``encoded``: one
    forward and backward pass per batch, each module's per-sequence gradients rotated into the pre-train
    eigenbasis once (the rotation keeps the norm; dividing by Λ_pt + λ there gives the self-influence)."""
    specs = [s for s in specs if s.name in pt_factors.specs]
    grad_sq, self_inf = np.zeros(len(encoded)), np.zeros(len(encoded))
    for rows, _, name, rot in _rotated_batches(model, specs, encoded, pt_factors, damping_pt, False, batch_size,
                                               pad_id, "document norms"):
        sq = rot * rot
        grad_sq[rows] += sq.sum(dim=(1, 2, 3)).double().cpu().numpy()
        damped = pt_factors.lam[name] + pt_factors.damping_for(name, damping_pt)[:, None, None]
        damped = damped.to(sq.device, sq.dtype)
        self_inf[rows] += (sq / damped).sum(dim=(1, 2, 3)).double().cpu().numpy()
    return DocumentNorms(grad_sq, self_inf)


def query_vectors(grads: MeasurementGradients, specs: Sequence[ModuleSpec], ft_factors: Factors | None,
                  pt_factors: Factors, projection: Projection, damping_ft: float | str = 1e-4,
                  damping_pt: float | str = 1e-4, whiten: bool = True, method: str = "ms_if") -> np.ndarray:
    """Query vectors ψ(x) [Q, dimensions] from measurement gradients on θ_ft, a slice of queries at a time
    (temporaries stay bounded).

    ``method="ms_if"``: Π Wᵀ P_ft ∇m (whiten) or Π Q_ptᵀ P_pt P_ft ∇m Q_pt (plain), so ⟨ψ, φ⟩ ≈ MS-IF.
    ``method="gdp"``: the gradient dot product ∇mᵀ∇ℓ from the same index, without ``ft_factors``:
    ψ = Π W⁻¹ ∇m = Π (Λ_pt + λ)^(+1/2) ⊙ Q_ptᵀ ∇m Q_pt (whiten; W is invertible for λ > 0) or Π Q_ptᵀ ∇m Q_pt
    (plain; Q_pt is orthogonal), so ⟨ψ, φ⟩ ≈ ∇m(x; θ_ft)ᵀ ∇ℓ(z; θ_pt)."""
    if method not in ("ms_if", "gdp"):
        raise ValueError(f"index query vectors are for ms_if or gdp, got {method!r}")
    if method == "ms_if" and ft_factors is None:
        raise ValueError("ms_if query vectors are preconditioned by the fine-tune factors; pass ft_factors")
    nq = grads.n_queries
    out = None
    for s in specs:
        if s.name not in projection.specs:
            continue
        tok = grads.tokens(s.name)
        for lo in range(0, nq, QUERY_SLICE):
            sl = slice(lo, min(lo + QUERY_SLICE, nq))
            src = dict(tokens=(tok[0][sl], tok[1][sl])) if tok is not None else dict(grads=grads[s.name][sl])
            if method == "ms_if":
                rot, _, _ = ft_factors.in_eigenbasis(s.name, damping_ft, pt_factors, damping_pt,
                                                     then_power=0.5 if whiten else 1.0, **src)
            else:
                rot, _, _ = pt_factors.in_eigenbasis(s.name, damping_pt, power=-0.5 if whiten else 0.0, **src)
            x = projection.apply(s.name, rot)
            if out is None:
                out = torch.zeros(nq, projection.dimensions, dtype=torch.float64 if x.dtype == torch.float64
                                  else torch.float32)
            out[sl, projection.columns(s.name)] = x.to("cpu", out.dtype)
            del rot, x
    if out is None:
        raise ValueError("no analysed module is in the projection")
    return out.numpy()


def encode_rows(vectors: np.ndarray, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray | None]:
    """Index rows as stored: float32 as they are (no scale), or float16 unit rows and their float32 norms
    (so no value overflows half precision; :func:`search` and :func:`pair_scores` take the norms as
    ``row_scale``). The stored rows times the norms equal ``vectors`` to float16's relative precision."""
    if dtype == "float32":
        return np.ascontiguousarray(vectors, dtype=np.float32), None
    if dtype != "float16":
        raise ValueError(f"index dtype must be float32 or float16, got {dtype!r}")
    rows = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1)
    return (rows / np.where(norms > 0, norms, 1.0)[:, None]).astype(np.float16), norms.astype(np.float32)


def score_scale(stored: np.ndarray, norms: np.ndarray | None, cosine: bool) -> np.ndarray | None:
    """The per-row factor that turns stored rows (:func:`encode_rows`) into the rows scored: for ``cosine``
    unit rows (float32 rows divided by their norm, zero rows kept zero; float16 rows are unit already), else
    the rows as built (float16 rows times their norms). None: use the stored rows as they are."""
    if norms is not None:
        return None if cosine else norms
    if not cosine:
        return None
    n = np.linalg.norm(np.asarray(stored, dtype=np.float32), axis=1)
    return np.where(n > 0, 1.0 / np.where(n > 0, n, 1.0), 0.0).astype(np.float32)


def unit_rows(vectors: np.ndarray, sq_norms: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit length (cosine scores; zero rows stay zero); with ``sq_norms`` (the exact
    squared norms of the unprojected rows, :class:`DocumentVectors`) divided by those instead."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True) if sq_norms is None else np.sqrt(sq_norms)[:, None]
    return vectors / np.where(norms > 0, norms, 1.0)


def index_scores(queries: np.ndarray, documents: np.ndarray, projection: Projection | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Index scores [N, Q] = φ ψᵀ, and with ``projection`` the same per block kind (``mlp``, ``mha``): the
    products over each kind's columns, whose sum is the score (one product over all columns either way).
    Holds [N, Q] float64 scores: for a large corpus, :func:`search` then :func:`pair_scores`."""
    if projection is None:
        return documents.astype(np.float64) @ queries.astype(np.float64).T, {}
    cols = kind_columns(projection)
    parts = {kind: documents[:, c].astype(np.float64) @ queries[:, c].astype(np.float64).T for kind, c in cols.items()}
    return sum(parts.values()), parts


def kind_columns(projection: Projection) -> dict[str, np.ndarray]:
    """The columns of each block kind (``mlp``, ``mha``) in a vector of ``projection``."""
    cols: dict[str, list[int]] = {}
    for name, j, sl in projection.block_columns():
        cols.setdefault(projection.specs[name].blocks[j].kind, []).extend(range(sl.start, sl.stop))
    return {kind: np.asarray(c, dtype=np.int64) for kind, c in cols.items()}


def pair_scores(queries: np.ndarray, documents: np.ndarray, positions: np.ndarray,
                projection: Projection | None = None, row_scale: np.ndarray | None = None,
                rows_per_step: int = 4096) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Index scores of chosen pairs: ``scores[q, j]`` = ⟨ψ_q, φ_positions[q, j]⟩ ([Q, K] float64; rows times
    ``row_scale`` where given), and with ``projection`` the same per block kind (their sum is the score).
    Only the documents some query chose are read, ``rows_per_step`` at a time, each against every query (one
    product per block kind over that kind's columns): the cost grows with the chosen documents, not the
    corpus. Products in float32 (float64 for float64 documents)."""
    dt = np.float64 if np.asarray(documents[:0]).dtype == np.float64 else np.float32
    q = np.asarray(queries, dtype=dt)
    cols = kind_columns(projection) if projection is not None else {"": slice(None)}
    q_t = {kind: np.ascontiguousarray(q[:, c].T) for kind, c in cols.items()}  # [its columns, Q]
    uniq, inverse = np.unique(positions, return_inverse=True)
    per_doc = {kind: np.empty((len(uniq), q.shape[0]), dtype=np.float64) for kind in cols}
    for lo in range(0, len(uniq), rows_per_step):
        at = uniq[lo:lo + rows_per_step]
        rows = np.asarray(documents[at], dtype=dt)
        if row_scale is not None:
            rows = rows * np.asarray(row_scale, dtype=dt)[at, None]
        for kind, c in cols.items():
            per_doc[kind][lo:lo + len(at)] = rows[:, c] @ q_t[kind]
    at = (inverse.reshape(positions.shape), np.broadcast_to(np.arange(q.shape[0])[:, None], positions.shape))
    parts = {kind: per_doc[kind][at] for kind in cols if kind}
    return (sum(parts.values()) if parts else per_doc[""][at]), parts


def search(queries: np.ndarray, documents: np.ndarray, k: int, rows_per_step: int = 65536,
           row_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` highest-scoring documents by inner product, exactly: (positions [Q, k], scores
    [Q, k]) in descending score order. Documents (any float dtype; float16 unit rows with their norms in
    ``row_scale``) are read ``rows_per_step`` rows at a time (memory holds one step's [Q, rows] scores), in
    float32 products."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    n = documents.shape[0]
    k = min(k, n)
    best_s = torch.full((q.shape[0], 0), -math.inf)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64)
    for lo in range(0, n, rows_per_step):
        d = torch.from_numpy(np.array(documents[lo:lo + rows_per_step], dtype=np.float32))  # a copy: may be read-only
        s = q @ d.T
        if row_scale is not None:
            s *= torch.from_numpy(np.array(row_scale[lo:lo + rows_per_step], dtype=np.float32))  # a copy
        top = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_s = torch.cat([best_s, top.values], dim=1)
        best_i = torch.cat([best_i, top.indices + lo], dim=1)
        keep = torch.topk(best_s, min(k, best_s.shape[1]), dim=1)
        best_s, best_i = keep.values, torch.gather(best_i, 1, keep.indices)
    return best_i.numpy(), best_s.numpy()
