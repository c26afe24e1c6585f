"""Query side: measurement gradients ∇m and their preconditioned forms ("query iHVPs", SPEC section 4).

- MS-IF: ``P_pt P_ft ∇m`` (both stages' EK-FAC inverses),
- SS-IF: ``P_ft ∇m``,
- GDP: ``∇m`` as is.

A query iHVP is one [P, d] matrix per module and query, kept exactly or, with ``rank > 0``, as a
rank-r factorisation ``U Vᵀ``: of the module's whole [P, d] matrix (``rank_scope="module"``, the
default: U [P, r] is stored split by block rows, V [d, r] is shared, so a module of n blocks keeps
(P + d)·r numbers) or of each block (``"block"``: n·(p + d)·r). Either is computed from the exact
per-block preconditioning; per-block scores stay exact for the approximated iHVP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import Encoded, iter_batches
from .ekfac import Factors, compute_dtype, read_json, read_tensors, rotate, save_tensor_dir
from .gradients import analysed_grads_only, forward_backward
from .methods import GRADIENT_METHODS
from .methods import get as get_method
from .models import ModuleSpec

log = logging.getLogger(__name__)

METHODS = GRADIENT_METHODS


class MeasurementGradients(Mapping[str, torch.Tensor]):
    """∇m per query and module; for short queries kept as the tokens it is summed from, ``Σ_t ds_t a_tᵀ``.

    ``grads[name]`` is the dense [Q, P, d] gradient (formed on each access from tokens). A module's
    tokens (``ds`` [Q, T, P], ``a`` [Q, T, d], zero on padding) are kept only while they take less memory
    than its dense gradients (T·(P + d) < P·d with T the longest query); :func:`query_ihvps` then
    preconditions from them, which is cheaper for short queries.
    """

    def __init__(self, ds: dict[str, torch.Tensor], a: dict[str, torch.Tensor],
                 dense: dict[str, torch.Tensor] | None = None) -> None:
        self.ds, self.a, self.dense = ds, a, dense or {}
        self.names = list(dict.fromkeys([*self.ds, *self.dense]))
        if not self.names:
            raise ValueError("measurement gradients of no module")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.dense:
            return self.dense[name]
        return torch.einsum("qtp,qtd->qpd", self.ds[name], self.a[name])

    def __contains__(self, name: object) -> bool:
        return name in self.ds or name in self.dense

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        t = self.dense.get(self.names[0], self.ds.get(self.names[0]))
        return int(t.shape[0])

    def tokens(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ds [Q, T, P], a [Q, T, d]) of module ``name``, or None where only its dense gradients are kept."""
        return (self.ds[name], self.a[name]) if name in self.ds else None

    def select(self, index: int | slice | list[int] | torch.Tensor) -> MeasurementGradients:
        """The gradients of the queries at ``index`` (in that order; an int keeps its query dimension)."""
        if isinstance(index, int):
            index = [index]

        def pick(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: x[index] for k, x in d.items()}
        return MeasurementGradients(pick(self.ds), pick(self.a), pick(self.dense))


def measurement_gradients(model: nn.Module, specs: list[ModuleSpec], encoded: Encoded, batch_size: int = 8,
                          pad_id: int | None = None) -> MeasurementGradients:
    """∇m per query and module (dense [Q, P, d] by ``grads[name]``) in the order of ``encoded``.

    m = −log p(completion | prompt) summed over target tokens (or −log p(label | x) with a
    classification head): the empirical loss of each query sequence.
    """
    if len(encoded) == 0:
        raise ValueError("no queries to compute measurement gradients for")
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad = pad_id if pad_id is not None else int(getattr(model.config, "pad_token_id", None) or 0)
    q, t_max = len(encoded), max(len(x) for x in encoded.input_ids)
    token_specs = [s for s in specs if t_max * (s.out_features + s.d) < s.out_features * s.d]
    ds = {s.name: torch.zeros(q, t_max, s.out_features, dtype=dtype, device=dev) for s in token_specs}
    a = {s.name: torch.zeros(q, t_max, s.d, dtype=dtype, device=dev) for s in token_specs}
    dense = {s.name: torch.zeros(q, s.out_features, s.d, dtype=dtype, device=dev) for s in specs if s.name not in ds}
    with analysed_grads_only(model, specs):
        for batch in iter_batches(encoded, batch_size, pad):
            cap = forward_backward(model, specs, batch.to(dev), fisher="empirical")
            idx = torch.tensor(batch.index, device=dev)
            t = batch.input_ids.shape[1]
            for s in specs:
                if s.name in ds:
                    ds[s.name][idx, :t] = cap.ds[s.name]
                    a[s.name][idx, :t] = cap.a[s.name]
                else:
                    dense[s.name][idx] = torch.einsum("btp,btd->bpd", cap.ds[s.name], cap.a[s.name])
    return MeasurementGradients(ds, a, dense)


@dataclass
class QueryIHVPs:
    """Preconditioned query gradients, per module: dense [Q, P, d] or low-rank factors, ``u`` [Q, n, p, r]
    (the rows of U by block) and ``v`` [Q, n, d, r], or [Q, 1, d, r] when one V serves the whole module."""

    method: str
    specs: dict[str, ModuleSpec]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # [Q, P, d]
    u: dict[str, torch.Tensor] = field(default_factory=dict)  # [Q, blocks, p, r]
    v: dict[str, torch.Tensor] = field(default_factory=dict)  # [Q, blocks, d, r] or [Q, 1, d, r] (module)
    rank: int = 0
    manifest: dict = field(default_factory=dict)

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        t = next(iter((self.dense or self.u).values()))
        return int(t.shape[0])

    def matrix(self, name: str) -> torch.Tensor:
        """The [Q, P, d] query iHVPs of module ``name`` (rebuilt from U Vᵀ when low-rank)."""
        if name in self.dense:
            return self.dense[name]
        u, v = self.u[name], self.v[name]
        m = torch.matmul(u, v.transpose(-1, -2))  # [Q, n, p, d]
        return m.reshape(m.shape[0], -1, m.shape[-1])

    def block_rows(self, name: str, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, queries: slice | None = None) -> torch.Tensor:
        """The query iHVPs of module ``name`` block by block, one row per query: [blocks, Q, p·d] (of the
        ``queries`` slice only, if given).

        Low-rank iHVPs are moved to ``device``, expanded straight into this layout (one batched product
        in their own precision) and cast to ``dtype``.
        """
        s = self.specs[name]
        sl = queries if queries is not None else slice(None)
        if name in self.dense:
            x = self.dense[name][sl].to(device, dtype)
            return x.reshape(-1, s.n_blocks, s.p * s.d).transpose(0, 1).contiguous()
        u, v = (self.u[name][sl].to(device).transpose(0, 1),  # [n, Q, p, r]
                self.v[name][sl].to(device).transpose(0, 1))  # [n or 1, Q, d, r]
        return torch.matmul(u, v.transpose(-1, -2)).reshape(s.n_blocks, -1, s.p * s.d).to(dtype)

    def sq_norm(self) -> float:
        """Σ over queries and modules of ‖iHVP‖²_F, from the low-rank factors without expanding them."""
        total = sum(float((x.double() ** 2).sum()) for x in self.dense.values())
        for name, u in self.u.items():
            u, v = u.double(), self.v[name].double()
            uu = torch.einsum("qnpr,qnps->qnrs", u, u)
            vv = torch.einsum("qndr,qnds->qnrs", v, v)
            total += float((uu * vv).sum())  # trace(UᵀU VᵀV) per block (a shared V broadcasts)
        return total

    def save(self, directory: str | Path) -> Path:
        """Write ``ihvps.safetensors`` and ``manifest.json`` atomically."""
        t = ({f"dense/{k}": x for k, x in self.dense.items()} | {f"u/{k}": x for k, x in self.u.items()}
             | {f"v/{k}": x for k, x in self.v.items()})
        man = dict(self.manifest) | {"method": self.method, "rank": self.rank,
                                     "modules": [s.to_json() for s in self.specs.values()]}
        return save_tensor_dir(directory, "ihvps.safetensors", t, man)

    @staticmethod
    def load(directory: str | Path, device: str | torch.device = "cpu") -> QueryIHVPs:
        """Read what ``save`` wrote."""
        directory = Path(directory)
        if not (directory / "manifest.json").exists():
            raise FileNotFoundError(f"{directory} holds no query iHVPs; compute them first")
        man = read_json(directory / "manifest.json")
        t, _ = read_tensors(directory / "ihvps.safetensors", device)
        specs = {d["name"]: ModuleSpec.from_json(d) for d in man["modules"]}
        part = {k: {n[len(k) + 1:]: x for n, x in t.items() if n.startswith(k + "/")} for k in ("dense", "u", "v")}
        return QueryIHVPs(man["method"], specs, part["dense"], part["u"], part["v"], int(man["rank"]), man)


def _low_rank(m: torch.Tensor, spec: ModuleSpec, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors per block: m [Q, P, d] -> U [Q, n, p, r] (singular values folded in), V."""
    q = m.shape[0]
    x = m.reshape(q, spec.n_blocks, spec.p, spec.d)
    r = min(rank, spec.p, spec.d)
    uu, ss, vh = torch.linalg.svd(x.double(), full_matrices=False)
    u = (uu[..., :r] * ss[..., None, :r]).to(m.dtype)
    v = vh[..., :r, :].transpose(-1, -2).to(m.dtype)
    return u, v


QUERY_SLICE = 16  # queries preconditioned (and rank-reduced) together, per module


def low_rank_numbers(spec: ModuleSpec, rank: int, rank_scope: str = "module") -> int:
    """Numbers a rank-r query iHVP of ``spec`` holds; a module where this is not below P·d is kept exact."""
    if rank_scope == "module":
        return (spec.out_features + spec.d) * min(rank, spec.out_features, spec.d)
    return spec.n_blocks * (spec.p + spec.d) * min(rank, spec.p, spec.d)
OVERSAMPLE = 10  # extra columns of the randomized range finder
POWER_ITERATIONS = 2


def low_rank_module(m: torch.Tensor, spec: ModuleSpec, rank: int,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of each query's whole [P, d] matrix: U [Q, n, p, r] (singular values folded in, rows
    split by block) and one V [Q, 1, d, r].

    Exact SVD where the matrix is small (min(P, d) ≤ 2·(r + 10)); otherwise the randomized range finder of
    Halko, Martinsson and Tropp (r + 10 seeded Gaussian columns, two power iterations, re-orthogonalised),
    whose error is within a small factor of the best rank-r error and is near it for the fast-decaying
    spectra of preconditioned gradients. Batched over queries, in at least float32.
    """
    q, big_p, d = m.shape
    r = min(rank, big_p, d)
    work = m.double() if m.dtype == torch.float64 else m.float()
    if min(big_p, d) <= 2 * (r + OVERSAMPLE):
        uu, ss, vh = torch.linalg.svd(work.double(), full_matrices=False)
        u, v = uu[..., :r] * ss[..., None, :r], vh[..., :r, :].transpose(-1, -2)
    else:
        k = r + OVERSAMPLE
        g = torch.Generator(device="cpu").manual_seed(seed)
        omega = torch.randn(d, k, generator=g, dtype=work.dtype).to(work.device)
        basis = torch.linalg.qr(work @ omega).Q  # [Q, P, k]
        for _ in range(POWER_ITERATIONS):
            basis = torch.linalg.qr(work.transpose(1, 2) @ basis).Q  # [Q, d, k]
            basis = torch.linalg.qr(work @ basis).Q  # [Q, P, k]
        small = basis.transpose(1, 2) @ work  # [Q, k, d]
        uu, ss, vh = torch.linalg.svd(small, full_matrices=False)
        u = (basis @ uu[..., :r]) * ss[..., None, :r]
        v = vh[..., :r, :].transpose(-1, -2)
    u = u.to(m.dtype).reshape(q, spec.n_blocks, spec.p, r)
    return u, v.to(m.dtype).reshape(q, 1, d, r)


def chunk_ihvps(model: nn.Module, specs: list[ModuleSpec], encoded: Encoded, methods: tuple[str, ...],
                ft_factors: Factors | None = None, pt_factors: Factors | None = None,
                damping_ft: float | str = 1e-4, damping_pt: float | str = 1e-4, rank: int = 0,
                batch_size: int = 8, pad_id: int | None = None) -> dict[str, QueryIHVPs]:
    """Query iHVPs of every method for the queries in ``encoded``, a slice of :data:`QUERY_SLICE` queries at a
    time: each slice's measurement gradients (on ``model``, θ_ft) are preconditioned for every method and
    dropped, so memory holds the iHVPs and one slice's gradients."""
    n = len(encoded)
    out: dict[str, QueryIHVPs] = {}
    for lo in range(0, n, QUERY_SLICE):
        hi = min(lo + QUERY_SLICE, n)
        grads = measurement_gradients(model, specs, encoded.subset(range(lo, hi)), batch_size, pad_id)
        for m in methods:
            def store(kind: str, name: str, x: torch.Tensor, m: str = m, lo: int = lo, hi: int = hi) -> None:
                # each module's result goes into the chunk's tensor at once (allocated once, no concatenation):
                # memory holds the chunk and one module's slice, never a second copy of the slice
                target = getattr(out[m], kind)
                if name not in target:
                    target[name] = x.new_empty((n, *x.shape[1:]))
                target[name][lo:hi] = x

            if m not in out:
                out[m] = QueryIHVPs(m, {})
            part = query_ihvps(grads, specs, m, ft_factors, pt_factors, damping_ft, damping_pt, rank, sink=store)
            out[m].specs, out[m].rank, out[m].manifest = dict(part.specs), part.rank, dict(part.manifest)
        del grads
    return out


def query_ihvps(grads: Mapping[str, torch.Tensor], specs: list[ModuleSpec], method: str,
                ft_factors: Factors | None = None, pt_factors: Factors | None = None,
                damping_ft: float | str = 1e-4, damping_pt: float | str = 1e-4, rank: int = 0,
                rank_scope: str = "module", sink: Callable[[str, str, torch.Tensor], None] | None = None) -> QueryIHVPs:
    """Precondition measurement gradients for ``method`` (``ms_if``, ``ss_if`` or ``gdp``); with ``rank > 0``,
    keep rank-r factors of each module (or block) where they take fewer numbers than the exact iHVP, the
    exact iHVP elsewhere.

    ``ms_if`` needs both factor sets; ``ss_if`` the fine-tune factors. Modules missing from a factor
    set (e.g. a replaced head) are skipped with a log line. ``grads`` from :func:`measurement_gradients`
    are preconditioned from their tokens where that is cheaper (short queries); any mapping of dense
    [Q, P, d] gradients works too. With ``sink``, each module's tensors are handed to
    ``sink(kind, name, tensor)`` (kind ``dense``, ``u`` or ``v``) as soon as they exist and are not kept.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if rank_scope not in ("module", "block"):
        raise ValueError(f"rank_scope must be 'module' or 'block', got {rank_scope!r}")
    m = get_method(method)
    if m.finetune_factors and ft_factors is None:
        raise ValueError(f"{method} needs the fine-tuned model's EK-FAC factors")
    if m.pretrain_factors and pt_factors is None:
        raise ValueError(f"{method} needs the pre-trained model's EK-FAC factors")
    out = QueryIHVPs(method, {}, rank=rank, manifest={
        "damping_ft": damping_ft if m.finetune_factors else None,
        "damping_pt": damping_pt if m.pretrain_factors else None} | ({"rank_scope": rank_scope} if rank else {}))
    tokens = isinstance(grads, MeasurementGradients)
    for s in specs:
        if m.finetune_factors and s.name not in ft_factors.specs:
            log.info("skipping %s: not in the fine-tune factors", s.name)
            continue
        if m.pretrain_factors and s.name not in pt_factors.specs:
            log.info("skipping %s: not in the pre-train factors", s.name)
            continue
        out.specs[s.name] = s
        n_q = grads.n_queries if tokens else grads[s.name].shape[0]
        low = rank > 0 and low_rank_numbers(s, rank, rank_scope) < s.out_features * s.d  # else exact is smaller
        pieces = []
        for lo in range(0, n_q, QUERY_SLICE):  # a slice of queries at a time: temporaries stay bounded
            sl = slice(lo, min(lo + QUERY_SLICE, n_q))
            basis = None
            if not m.finetune_factors:  # GDP: ∇m as is
                g = grads[s.name][sl]
                out_dtype = compute_dtype(g.dtype)
                g = g.to(out_dtype)
            else:  # P_ft ∇m, then (MS-IF) P_pt of that, in the last factors' eigenbasis
                then = pt_factors if m.pretrain_factors else None
                tok = grads.tokens(s.name) if tokens else None
                src = dict(tokens=(tok[0][sl], tok[1][sl])) if tok is not None else dict(grads=grads[s.name][sl])
                rot, qs, qa = ft_factors.in_eigenbasis(s.name, damping_ft, then, damping_pt, **src)
                out_dtype = compute_dtype((tok[0] if tok is not None else grads[s.name]).dtype)
                if low:  # factor R, then rotate the factors: U = Q_S U_R, V = Q_A V_R (no dense rotation back)
                    g, basis = rot.reshape(rot.shape[0], s.out_features, s.d), (qs, qa)
                else:
                    g = rotate(rot, qs, qa, back=True).reshape(-1, s.out_features, s.d).to(out_dtype)
                del rot
            if low:
                u, v = low_rank_module(g, s, rank) if rank_scope == "module" else _low_rank(g, s, rank)
                if basis is not None:
                    qs, qa = basis
                    u = torch.einsum("npk,qnkr->qnpr", qs.to(u.dtype), u)
                    v = torch.matmul(qa.to(v.dtype), v)
                g = (u.to(out_dtype).contiguous(), v.to(out_dtype).contiguous())  # as a saved copy reads back
                del u, v
            pieces.append(g)
            del g
        if low:
            done = {"u": torch.cat([u for u, _ in pieces]) if len(pieces) > 1 else pieces[0][0],
                    "v": torch.cat([v for _, v in pieces]) if len(pieces) > 1 else pieces[0][1]}
        else:
            done = {"dense": torch.cat(pieces) if len(pieces) > 1 else pieces[0]}
        del pieces
        for kind, x in done.items():
            if sink is not None:
                sink(kind, s.name, x)
            else:
                getattr(out, kind)[s.name] = x
        del done
    return out
