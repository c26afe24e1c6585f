"""EK-FAC factors: fit, merge, save, load, and precondition (SPEC section 3).

Fitting has two streaming passes, each a sum that can be computed per shard and merged:

1. covariance pass: ``A = mean_t a aᵀ`` per module and ``S = mean_t ds dsᵀ`` per block;
   then ``Q_A``, ``Q_S`` from ``torch.linalg.eigh`` in float64 (:func:`eigenbasis`);
2. Λ pass: ``Λ = mean_n (Q_Sᵀ DW_n Q_A)²`` over sequences n, with ``DW_n = Σ_t ds_t a_tᵀ``.

Both passes use the same gradients: with the true Fisher, the Λ pass replays the covariance pass's
seeded draws. So :func:`fit_ekfac` keeps what the Λ pass needs from the covariance pass in memory
(:class:`PassCache`, up to ``FitSettings.cache_mib``, by default a quarter of the memory available) and
runs a second forward/backward only for the batches that did not fit; the result is the same either way.

Per module, the stored factors are ``Q_A`` [d, d], ``Q_S`` [blocks, p, p] and ``Λ`` [blocks, p, d]:
d² + Σ p² + d·P numbers. Damping is added only when preconditioning, never into ``Λ``.

Why one file of ~650 lines: the fit passes and :class:`Factors` share the rotation helpers
(``_rotate``, ``_rotate_tokens``, ``_per_sequence_branch``: the Λ pass and query preconditioning apply the
same rotation), and the file reads top to bottom as SPEC section 3, from the sums to their use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .data import Encoded, iter_batches
from .gradients import analysed_grads_only, forward_backward
from .memory import available_memory
from .models import FINGERPRINT_VERSION, ModuleSpec, fingerprint
from .settings import FactorSettings, default_of

log = logging.getLogger(__name__)

FACTORS_FORMAT = "msif-ekfac-1"


@dataclass
class FitSettings:
    """How EK-FAC factors are fitted."""

    fisher: str = field(default=default_of(FactorSettings, "fisher"),
                        metadata={"help": "'true' samples targets from the model; 'empirical' uses the data's tokens."})
    max_examples: int = field(default=default_of(FactorSettings, "max_examples"),
                              metadata={"help": "Cap on sequences used in each pass."})
    batch_size: int = field(default=default_of(FactorSettings, "batch_size"),
                            metadata={"help": "Sequences per forward/backward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the true-Fisher target sampling."})
    shard: int = field(default=0, metadata={"help": "Shard index, mixed into the seed per shard."})
    cache_mib: float | None = field(default=None, metadata={
        "help": "Memory (MiB) for keeping the covariance pass's gradients so that the Λ pass needs no second "
                "forward/backward over them; 0 always recomputes; None (default): a quarter of the memory "
                "available on the model's device when the fit starts, at most 16 GiB. Results do not depend "
                "on it."})

    def generator(self) -> torch.Generator:
        """The seeded (CPU) generator of one shard's true-Fisher draws; each pass starts a fresh one, so
        both passes draw the same targets, and a model on a GPU draws the same targets as on the CPU."""
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.shard * 7919 + 1)
        return g


def _pad(model: nn.Module, pad_id: int | None) -> int:
    if pad_id is not None:
        return pad_id
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "pad_token_id", None) or 0)


def _limit(encoded: Encoded, cap: int) -> Encoded:
    return encoded if len(encoded) <= cap else encoded.subset(range(cap))


class _Progress:
    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done, self.tokens = what, total, 0, 0
        self.t0 = self.last = time.perf_counter()

    def step(self, n: int, tokens: int) -> None:
        self.done += n
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last > 10 or self.done == self.total:
            rate = self.tokens / max(now - self.t0, 1e-9)
            log.info("%s: %d/%d sequences, %.0f tokens/s", self.what, self.done, self.total, rate)
            self.last = now

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


@dataclass
class CovarianceSums:
    """Unnormalised covariance sums of one pass over some data (mergeable across shards)."""

    a: dict[str, torch.Tensor]  # [d, d]
    s: dict[str, torch.Tensor]  # [blocks, p, p]
    tokens: int = 0
    sequences: int = 0

    def merge(self, other: CovarianceSums) -> CovarianceSums:
        """Sum of two partial results."""
        return CovarianceSums({k: v + other.a[k] for k, v in self.a.items()},
                              {k: v + other.s[k] for k, v in self.s.items()},
                              self.tokens + other.tokens, self.sequences + other.sequences)

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors."""
        t = {f"a/{k}": v for k, v in self.a.items()} | {f"s/{k}": v for k, v in self.s.items()}
        _atomic_safetensors(t, path, {"tokens": str(self.tokens), "sequences": str(self.sequences)})

    @staticmethod
    def load(path: str | Path) -> CovarianceSums:
        """Read what ``save`` wrote."""
        t, meta = read_tensors(path)
        return CovarianceSums({k[2:]: v for k, v in t.items() if k.startswith("a/")},
                              {k[2:]: v for k, v in t.items() if k.startswith("s/")},
                              int(meta["tokens"]), int(meta["sequences"]))


@dataclass
class LambdaSums:
    """Unnormalised sums of squared rotated per-sequence gradients (mergeable across shards)."""

    lam: dict[str, torch.Tensor]  # [blocks, p, d]
    sequences: int = 0
    truncated: int = 0  # sequences cut to the maximum length before the fit

    def merge(self, other: LambdaSums) -> LambdaSums:
        """Sum of two partial results."""
        return LambdaSums({k: v + other.lam[k] for k, v in self.lam.items()}, self.sequences + other.sequences,
                          self.truncated + other.truncated)

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors."""
        _atomic_safetensors(self.lam, path, {"sequences": str(self.sequences), "truncated": str(self.truncated)})

    @staticmethod
    def load(path: str | Path) -> LambdaSums:
        """Read what ``save`` wrote."""
        t, meta = read_tensors(path)
        return LambdaSums(t, int(meta["sequences"]), int(meta.get("truncated", 0)))


@dataclass
class Eigenbasis:
    """Eigenvectors of the covariances: ``q_a`` [d, d] per module, ``q_s`` [blocks, p, p] per module."""

    q_a: dict[str, torch.Tensor]
    q_s: dict[str, torch.Tensor]
    tokens: int = 0

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors."""
        t = {f"q_a/{k}": v for k, v in self.q_a.items()} | {f"q_s/{k}": v for k, v in self.q_s.items()}
        _atomic_safetensors(t, path, {"tokens": str(self.tokens)})

    @staticmethod
    def load(path: str | Path) -> Eigenbasis:
        """Read what ``save`` wrote."""
        t, meta = read_tensors(path)
        return Eigenbasis({k[4:]: v for k, v in t.items() if k.startswith("q_a/")},
                          {k[4:]: v for k, v in t.items() if k.startswith("q_s/")}, int(meta["tokens"]))


CACHE_AUTO_SHARE = 0.25  # of the memory available when the fit starts
CACHE_AUTO_MAX = 16 * 2**30


def cache_budget(settings: FitSettings, device: torch.device) -> int:
    """The pass cache's budget in bytes: ``settings.cache_mib`` if given, else a quarter of the memory
    available on ``device`` (at most 16 GiB; 1 GiB where the available memory cannot be read)."""
    if settings.cache_mib is not None:
        if settings.cache_mib < 0:
            raise ValueError(f"FitSettings.cache_mib must be >= 0 (or None for automatic), got {settings.cache_mib}")
        return int(settings.cache_mib * 2**20)
    avail = available_memory(device)
    if avail is None:
        return 2**30
    return int(min(avail * CACHE_AUTO_SHARE, CACHE_AUTO_MAX))


class PassCache:
    """What the Λ pass needs from the first batches of the covariance pass, kept within a memory budget.

    Per batch and module: the sequence gradients ``Σ_t ds_t a_tᵀ`` [B, P, d] when the Λ pass would form
    them anyway (long sequences), else the token ``a`` and ``ds``. ``state`` is the generator state after
    the last cached batch, from where the Λ pass resumes the draws for the batches it recomputes.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget, self.used = budget_bytes, 0
        self.batches: list[dict[str, tuple[torch.Tensor, ...]]] = []
        self.state: torch.Tensor | None = None
        self.full = budget_bytes <= 0

    def offer(self, entry: dict[str, tuple[torch.Tensor, ...]], state: torch.Tensor) -> None:
        """Keep one batch's entry if it fits; after the first refusal keep nothing more."""
        if self.full:
            return
        size = sum(t.numel() * t.element_size() for ts in entry.values() for t in ts)
        if self.used + size > self.budget:
            self.full = True
            return
        self.batches.append(entry)
        self.used += size
        self.state = state


def rotate(x: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor, back: bool = False) -> torch.Tensor:
    """``Q_Sᵀ X Q_A`` per block of ``x`` [..., blocks, p, d] (``back``: ``Q_S X Q_Aᵀ``), as batched matrix
    products, which BLAS runs faster than the equivalent three-operand einsum."""
    if back:
        return torch.matmul(qs, x @ qa.transpose(0, 1))
    return torch.matmul(qs.transpose(-1, -2), x @ qa)


def _per_sequence_branch(s: ModuleSpec, t: int) -> bool:
    """Whether the Λ pass forms each sequence's gradient and rotates it once (cost P·d·(p + d)) rather
    than rotating every token's a and ds (cost T·(d² + P·p))."""
    return t * (s.d * s.d + s.out_features * s.p) >= s.out_features * s.d * (s.p + s.d)


def _lambda_inputs(s: ModuleSpec, a: torch.Tensor, ds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the Λ pass needs of one module's captures [B, T, ·]: (sequence gradients,) or (a, ds)."""
    if _per_sequence_branch(s, a.shape[1]):  # formed in float32 at least (half-precision captures)
        return (torch.einsum("btp,btd->bpd", ds.to(_compute_dtype(ds)), a.to(_compute_dtype(a))),)
    return a, ds


def _add_lambda(lam: torch.Tensor, s: ModuleSpec, inputs: tuple[torch.Tensor, ...], qa: torch.Tensor,
                qs: torch.Tensor) -> None:
    """lam += Σ_n (Q_Sᵀ DW_n Q_A)² over the batch's sequences n (in the bases' dtype: float32 at least)."""
    inputs = tuple(x.to(qa.dtype) for x in inputs)
    if len(inputs) == 1:  # long sequences: rotate each sequence's gradient once
        g = rotate(inputs[0].view(-1, s.n_blocks, s.p, s.d), qs, qa)
    else:  # short sequences: rotate each token's a and ds, then sum over tokens
        g = _rotate_tokens(s, inputs[1], inputs[0], qs, qa)
    lam += (g * g).sum(0).to(torch.float64)


def _rotate_tokens(s: ModuleSpec, ds: torch.Tensor, a: torch.Tensor, qs: torch.Tensor,
                   qa: torch.Tensor) -> torch.Tensor:
    """``Q_Sᵀ (Σ_t ds_t a_tᵀ) Q_A`` per sequence and block from the tokens ds [B, T, P] and a [B, T, d]:
    each token is rotated, then the sum over tokens is one batched product; [B, blocks, p, d]."""
    ds = ds.reshape(*ds.shape[:2], s.n_blocks, s.p)
    return torch.einsum("btnq,btd->bnqd", torch.einsum("btnp,npq->btnq", ds, qs), a @ qa)


def _bands(d: int, n_parts: int = 4) -> list[int]:
    """Edges of the column bands of a [d, d] covariance summed band by band; [] = one full product."""
    return [] if d < 256 else [round(i * d / n_parts) for i in range(n_parts + 1)]


def _add_gram_upper(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += xᵀ x`` for ``x`` [N, d]: wide matrices only on and right of the diagonal blocks.

    The columns are cut into bands (:func:`_bands`) and only the products of a band with itself and
    with the bands right of it are formed: 10/16 of the flops of ``x.t() @ x`` with 4 bands.
    :func:`_mirror_lower` completes the matrix.
    """
    x = x.to(_compute_dtype(x))  # half-precision captures: products and sums in float32, not 8-bit mantissas
    edges = _bands(x.shape[1])
    if not edges:
        acc += (x.t() @ x).to(acc.dtype)
        return
    xt = x.t()
    for lo, hi in zip(edges[:-1], edges[1:]):
        acc[lo:hi, lo:] += (xt[lo:hi] @ x[:, lo:]).to(acc.dtype)


def _mirror_lower(m: torch.Tensor) -> torch.Tensor:
    """Fill the blocks below the diagonal blocks of ``m`` [..., d, d] (summed by :func:`_add_gram_upper`)
    with the transposes of those above, in place; returns ``m``."""
    edges = _bands(m.shape[-1])
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        for lo2, hi2 in zip(edges[i + 1:-1], edges[i + 2:]):
            m[..., lo2:hi2, lo:hi] = m[..., lo:hi, lo2:hi2].transpose(-1, -2)
    return m


def covariance_sums(model: nn.Module, specs: list[ModuleSpec], encoded: Encoded,
                    settings: FitSettings, pad_id: int | None = None,
                    cache: PassCache | None = None) -> CovarianceSums:
    """First pass: Σ_t a aᵀ per module and Σ_t ds dsᵀ per block over non-padding tokens.

    With ``cache``, also keeps what :func:`lambda_sums` needs for as many batches as its budget allows.
    """
    if len(encoded) == 0:
        raise ValueError("cannot fit EK-FAC factors on an empty data set")
    encoded = _limit(encoded, settings.max_examples)
    dev = next(model.parameters()).device
    acc = torch.float64
    a_sum = {s.name: torch.zeros(s.d, s.d, dtype=acc, device=dev) for s in specs}
    s_sum = {s.name: torch.zeros(s.n_blocks, s.p, s.p, dtype=acc, device=dev) for s in specs}
    gen = settings.generator()
    prog = _Progress("EK-FAC covariance pass", len(encoded))
    tokens = 0
    with analysed_grads_only(model, specs):
        for batch in iter_batches(encoded, settings.batch_size, _pad(model, pad_id)):
            batch = batch.to(dev)
            cap = forward_backward(model, specs, batch, settings.fisher, gen)
            n = batch.n_tokens
            tokens += n
            for s in specs:  # padding rows of a and ds are zero, so they add nothing
                _add_gram_upper(a_sum[s.name], cap.a[s.name].reshape(-1, s.d))
                if s.n_blocks == 1:
                    _add_gram_upper(s_sum[s.name][0], cap.ds[s.name].reshape(-1, s.p))
                else:
                    ds = cap.ds[s.name].reshape(-1, s.n_blocks, s.p)
                    ds = ds.to(_compute_dtype(ds))
                    s_sum[s.name] += torch.einsum("nbp,nbq->bpq", ds, ds).to(acc)
            if cache is not None and not cache.full:
                cache.offer({s.name: _lambda_inputs(s, cap.a[s.name], cap.ds[s.name]) for s in specs},
                            gen.get_state())
            prog.step(len(batch.index), n)
    return CovarianceSums({k: _mirror_lower(v) for k, v in a_sum.items()},
                          {k: _mirror_lower(v) if v.shape[0] == 1 else v for k, v in s_sum.items()}, tokens,
                          len(encoded))


def eigenbasis(sums: CovarianceSums, specs: list[ModuleSpec] | None = None, consume: bool = False) -> Eigenbasis:
    """Eigenvectors of the mean covariances (float64 ``eigh``); names a block with non-finite values
    (by its name when ``specs`` are given, else by its index in the module). ``consume``: drop each
    module's sums from ``sums`` once its eigenvectors exist, so that covariances and bases of every module
    are never held together (at Pythia-410M's shapes each set is ~7 GB in float64)."""
    if sums.tokens == 0:
        raise ValueError("covariance sums hold no tokens")
    names = {sp.name: [b.name for b in sp.blocks] for sp in specs or []}
    q_a, q_s = {}, {}
    for name in list(sums.a):
        a = sums.a[name] / sums.tokens
        s = sums.s[name] / sums.tokens
        where = None
        if not torch.isfinite(a).all():
            where = f"activation covariance A in module {name} (shared by all its blocks)"
        elif not torch.isfinite(s).all():
            j = int((~torch.isfinite(s)).flatten(1).any(1).nonzero()[0])
            block = names[name][j] if name in names else f"{name} (block {j})"
            where = f"gradient covariance S in block {block}"
        if where:
            raise FloatingPointError(
                f"non-finite {where}; the model's activations or gradients overflow: fit in float32 or "
                f"float64 instead of half precision (dtype=...), or check the checkpoint for inf/nan weights")
        q_a[name] = _eigenvectors(a, f"activation covariance A of module {name}")
        q_s[name] = _eigenvectors(s, f"gradient covariances S of module {name}")
        del a, s
        if consume:
            sums.a[name] = sums.s[name] = None
    if consume:
        sums.a, sums.s = {}, {}
    return Eigenbasis(q_a, q_s, sums.tokens)


def _eigenvectors(c: torch.Tensor, what: str) -> torch.Tensor:
    """float64 ``eigh`` eigenvectors (ascending eigenvalues). Where LAPACK's ``eigh`` does not converge,
    the same basis from another algorithm: the SVD of the symmetrised matrix (a covariance is positive
    semi-definite, so its singular vectors are eigenvectors), reordered to ascending; where that fails
    too, an error naming the covariance."""
    c = c.double()
    try:
        return torch.linalg.eigh(c)[1]
    except torch.linalg.LinAlgError as first:
        log.warning("eigh did not converge for the %s (%s); using the SVD instead", what, first)
        try:
            u = torch.linalg.svd((c + c.transpose(-1, -2)) / 2)[0]
            return u.flip(-1)
        except torch.linalg.LinAlgError as e:
            raise FloatingPointError(
                f"the eigendecomposition of the {what} did not converge ({e}); its values are too extreme "
                f"to decompose: fit in float32 or float64 rather than half precision, check the checkpoint "
                f"for huge weights, or leave the module out (name the modules to analyse in module_tags)") from e


def lambda_sums(model: nn.Module, specs: list[ModuleSpec], encoded: Encoded, basis: Eigenbasis,
                settings: FitSettings, pad_id: int | None = None, cache: PassCache | None = None) -> LambdaSums:
    """Second pass: Σ_n (Q_Sᵀ DW_n Q_A)² per block, n over sequences.

    The gradients are the covariance pass's (same batches, same draws): taken from ``cache`` for the
    batches it holds, recomputed for the rest.
    """
    if len(encoded) == 0:
        raise ValueError("cannot fit EK-FAC factors on an empty data set")
    truncated = encoded.n_truncated
    encoded = _limit(encoded, settings.max_examples)
    dev = next(model.parameters()).device
    dtype = _compute_dtype(next(iter(model.parameters())))  # float32 for half-precision models
    lam = {s.name: torch.zeros(s.n_blocks, s.p, s.d, dtype=torch.float64, device=dev) for s in specs}
    qa = {s.name: basis.q_a[s.name].to(dev, dtype) for s in specs}
    qs = {s.name: basis.q_s[s.name].to(dev, dtype) for s in specs}
    cached = cache.batches if cache is not None else []
    gen = settings.generator()
    if cached:
        gen.set_state(cache.state)
    prog = _Progress("EK-FAC eigenvalue pass", len(encoded))
    with analysed_grads_only(model, specs):
        for i, batch in enumerate(iter_batches(encoded, settings.batch_size, _pad(model, pad_id))):
            if i < len(cached):
                entry = cached[i]
                cached[i] = {}  # release memory as we go
            else:
                batch = batch.to(dev)
                cap = forward_backward(model, specs, batch, settings.fisher, gen)
                entry = {s.name: _lambda_inputs(s, cap.a[s.name], cap.ds[s.name]) for s in specs}
            for s in specs:
                _add_lambda(lam[s.name], s, entry[s.name], qa[s.name], qs[s.name])
            prog.step(len(batch.index), batch.n_tokens)
    if cache is not None:  # spent: a later pass recomputes from the start
        cache.batches, cache.state = [], None
    return LambdaSums(lam, len(encoded), truncated)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision msif computes and keeps factors, iHVPs and scores in for a model of ``dtype``: its own
    for float32/float64, float32 for half precision (8 bits of mantissa would cost the results their
    accuracy; the model's own passes stay in half precision)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """:func:`compute_dtype` of a tensor: iHVPs are computed in the gradients' precision (float64 factors
    are cast, not the other way round)."""
    return compute_dtype(x.dtype)


@dataclass
class Factors:
    """Fitted EK-FAC factors of one model, with the manifest that says what they belong to."""

    specs: dict[str, ModuleSpec]
    q_a: dict[str, torch.Tensor]
    q_s: dict[str, torch.Tensor]
    lam: dict[str, torch.Tensor]
    manifest: dict

    def to(self, device: torch.device | str) -> Factors:
        """The same factors with their tensors on ``device``."""
        def move(d: MutableMapping[str, torch.Tensor]) -> MutableMapping[str, torch.Tensor]:
            if isinstance(d, LazyTensors):  # still read on use, now onto ``device``
                return d.moved(device)
            return {k: v.to(device) for k, v in d.items()}
        return Factors(self.specs, move(self.q_a), move(self.q_s), move(self.lam), self.manifest)

    def damping_for(self, name: str, damping: float | str) -> torch.Tensor:
        """Per-block damping: a number (absolute) or ``"relative:c"`` = c × mean(Λ) of each block."""
        lam = self.lam[name]
        if isinstance(damping, str):
            if not damping.startswith("relative:"):
                raise ValueError(f"damping must be a number or 'relative:<c>', got {damping!r}")
            c = float(damping.split(":", 1)[1])
            return c * lam.mean(dim=(1, 2))
        return torch.full((lam.shape[0],), float(damping), dtype=lam.dtype, device=lam.device)

    def precondition(self, name: str, v: torch.Tensor, damping: float | str, then: Factors | None = None,
                     then_damping: float | str = 1e-4) -> torch.Tensor:
        """iHVP ``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` of gradients ``v`` [..., P, d] of module ``name``.

        With ``then`` (another model's factors of the same blocks, damped by ``then_damping``), the result
        is preconditioned by those too, ``P_then P_self V`` (MS-IF's ``P_pt P_ft ∇m``): the change from
        this eigenbasis to the other is one rotation by ``Q_Sᵀ Q'_S`` and ``Q_Aᵀ Q'_A``, not a rotation back
        followed by a rotation in.
        """
        s = self.specs[name]
        rot, qs, qa = self.in_eigenbasis(name, damping, then, then_damping, grads=v)
        return rotate(rot, qs, qa, back=True).reshape(*v.shape[:-2], s.out_features, s.d).to(v.dtype)

    def precondition_tokens(self, name: str, ds: torch.Tensor, a: torch.Tensor, damping: float | str,
                            route: str = "auto", then: Factors | None = None,
                            then_damping: float | str = 1e-4) -> torch.Tensor:
        """iHVPs (as :meth:`precondition`, ``then`` too) of per-sequence gradients given by their tokens:
        ``Σ_t ds_t a_tᵀ`` for ds [m, T, P] and a [m, T, d]; returns [m, P, d].

        A gradient of T tokens has rank at most T: for short sequences (``route="tokens"``, chosen by flop
        count under ``"auto"``) each token is rotated into the eigenbasis, ``(ds Q_S)ᵀ (a Q_A)``, instead of
        forming the [P, d] gradient and rotating it (``"dense"``), which costs P·d·(p + d) per sequence.
        """
        s = self.specs[name]
        rot, qs, qa = self.in_eigenbasis(name, damping, then, then_damping, tokens=(ds, a), route=route)
        return rotate(rot, qs, qa, back=True).reshape(-1, s.out_features, s.d).to(ds.dtype)

    def in_eigenbasis(self, name: str, damping: float | str, then: Factors | None = None,
                      then_damping: float | str = 1e-4, grads: torch.Tensor | None = None,
                      tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
                      route: str = "auto", power: float = 1.0,
                      then_power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The iHVPs of :meth:`precondition` (``grads`` [..., P, d]) or :meth:`precondition_tokens`
        (``tokens`` = (ds, a)) before their last rotation: ``(R, Q_S, Q_A)`` with R [m, blocks, p, d] and
        iHVP = ``Q_S R Q_Aᵀ`` per block, in the eigenbasis of the last factors applied (``then``'s if
        given). Rank-r factors of R rotated by Q_S and Q_A are rank-r factors of the iHVP with the same
        singular values, so a low-rank query side can skip the dense rotation back (:mod:`msif_core.query`).

        ``power`` (and ``then_power``) raise each factor set's damped eigenvalues: the rotated gradient is
        divided by ``(Λ + λ)^power`` (1: the iHVP; 0.5: the whitened ``Wᵀ G`` with ``P = W Wᵀ`` of the
        influence index, :mod:`msif_core.index`; 0: the rotated gradient itself).
        """
        if route not in ("auto", "tokens", "dense"):
            raise ValueError(f"route must be auto, tokens or dense, got {route!r}")
        if (grads is None) == (tokens is None):
            raise ValueError("give grads or tokens, not both")
        s = self.specs[name]
        if tokens is not None and (route == "dense" or
                                   (route == "auto" and _per_sequence_branch(s, tokens[0].shape[1]))):
            grads, tokens = torch.einsum("mtp,mtd->mpd", *tokens), None
        dt = _compute_dtype(grads if tokens is None else tokens[0])
        dev = (grads if tokens is None else tokens[0]).device
        qa, qs = self._bases(name, dev, dt)
        if tokens is None:
            rot = rotate(grads.reshape(-1, s.n_blocks, s.p, s.d).to(dt), qs, qa)  # [m, n, p, d]
        else:
            rot = _rotate_tokens(s, tokens[0].to(dt), tokens[1].to(dt), qs, qa)
        if power:
            rot.div_(self._damped(name, damping, rot, power))
        if then is None:
            return rot, qs, qa
        if name not in then.specs or then.q_s[name].shape != self.q_s[name].shape \
                or then.q_a[name].shape != self.q_a[name].shape:
            raise ValueError(f"module {name} has different blocks in the two factor sets; both must be "
                             "fitted on models of the same architecture")
        # bases' products in the factors' own (float64) precision, then cast
        mine_s, mine_a = self.q_s[name], self.q_a[name]
        cs = (mine_s.transpose(-1, -2) @ then.q_s[name].to(mine_s.device, mine_s.dtype)).to(dev, dt)
        ca = (mine_a.transpose(-1, -2) @ then.q_a[name].to(mine_a.device, mine_a.dtype)).to(dev, dt)
        rot = rotate(rot, cs, ca)
        if then_power:
            rot.div_(then._damped(name, then_damping, rot, then_power))
        qa, qs = then._bases(name, dev, dt)
        return rot, qs, qa

    def _bases(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_A, Q_S) of module ``name`` on ``device`` in ``dtype``."""
        return self.q_a[name].to(device, dtype), self.q_s[name].to(device, dtype)

    def _damped(self, name: str, damping: float | str, like: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        """(Λ + λ)^power of module ``name`` [blocks, p, d] on the device and in the dtype of ``like`` (Λ is
        unchanged; the power is taken in the factors' own precision)."""
        damped = self.lam[name] + self.damping_for(name, damping)[:, None, None]
        return (damped if power == 1.0 else damped.pow(power)).to(like.device, like.dtype)

    def check_finite(self) -> None:
        """Raise naming the first module with non-finite or negative Λ."""
        for name, lam in self.lam.items():
            if not torch.isfinite(lam).all():
                raise FloatingPointError(
                    f"non-finite eigenvalues Λ in module {name}: its per-sequence gradients overflow; fit in "
                    f"float32 or float64 rather than half precision, or check the checkpoint for inf/nan weights")
            if (lam < 0).any():
                raise FloatingPointError(f"negative eigenvalues Λ in module {name}: the factors are corrupt; "
                                         f"refit them")

    def resident_bytes(self) -> int:
        """Bytes these factors hold in memory (lazily read ones: none beyond the modules in use)."""
        return sum(t.numel() * t.element_size() for d in (self.q_a, self.q_s, self.lam)
                   if not isinstance(d, LazyTensors) for t in d.values())

    def n_floats(self) -> int:
        """Stored numbers: Σ over modules of d² + Σ p² + d·P (from the block shapes: nothing is read)."""
        return sum(module_floats(s) for s in self.specs.values())

    def save(self, directory: str | Path) -> Path:
        """Write ``factors.safetensors`` and ``manifest.json`` into ``directory`` atomically."""
        tensors = {}
        for n in self.specs:
            tensors |= {f"q_a/{n}": self.q_a[n], f"q_s/{n}": self.q_s[n], f"lam/{n}": self.lam[n]}
        manifest = dict(self.manifest) | {"format": FACTORS_FORMAT,
                                          "modules": [s.to_json() for s in self.specs.values()]}
        return save_tensor_dir(directory, "factors.safetensors", tensors, manifest)

    @staticmethod
    def load(directory: str | Path, expect_fingerprint: str | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None, lazy: bool = False) -> Factors:
        """Read factors; with ``expect_fingerprint``, refuse factors fitted on another model. ``dtype``
        (e.g. float32 for a float32 model, whose gradients are preconditioned in float32 anyway) casts them
        as they are read: half the memory of the float64 file, each tensor converted once.

        ``lazy``: read each module's tensors from the file only when they are used (:class:`LazyTensors`,
        the last two modules kept), so that preconditioning with both stages' factors holds a module or two of
        each, never every module of both (the memory plan counts it so)."""
        directory = Path(directory)
        mpath, fpath = directory / "manifest.json", directory / "factors.safetensors"
        if not mpath.exists() or not fpath.exists():
            raise FileNotFoundError(f"{directory} holds no EK-FAC factors (manifest.json + factors.safetensors); "
                                    f"fit them first")
        manifest = read_json(mpath)
        if manifest.get("format") != FACTORS_FORMAT:
            raise ValueError(f"{mpath}: unknown factors format {manifest.get('format')!r}")
        if expect_fingerprint is not None and manifest.get("fingerprint_version", 1) != FINGERPRINT_VERSION:
            raise ValueError(
                f"factors in {directory} were written by an older msif, whose model fingerprint (version "
                f"{manifest.get('fingerprint_version', 1)}) cannot be checked against this one (version "
                f"{FINGERPRINT_VERSION}); refit them (the model itself may be unchanged)")
        if expect_fingerprint is not None and manifest.get("fingerprint") != expect_fingerprint:
            raise ValueError(
                f"factors in {directory} were fitted on another model (fingerprint "
                f"{manifest.get('fingerprint')}, this model is {expect_fingerprint}); refit them")
        specs = {d["name"]: ModuleSpec.from_json(d) for d in manifest["modules"]}
        if lazy:
            names = list(specs)
            keys = tensor_keys(fpath)
            missing = [f"{k}/{n}" for n in names for k in ("q_a", "q_s", "lam") if f"{k}/{n}" not in keys]
            if missing:
                raise UnreadableFileError(f"{fpath} lacks {len(missing)} tensors its manifest names (first: "
                                          f"{missing[0]}); it was altered or truncated: refit the factors")
            return Factors(specs, *(LazyTensors(fpath, kind, names, device, dtype) for kind in ("q_a", "q_s", "lam")),
                           manifest)
        t, _ = read_tensors(fpath, device, dtype)
        return Factors(specs, {n: t[f"q_a/{n}"] for n in specs}, {n: t[f"q_s/{n}"] for n in specs},
                       {n: t[f"lam/{n}"] for n in specs}, manifest)


def module_floats(spec: ModuleSpec) -> int:
    """Numbers of one module's factors: Q_A d², Q_S n·p², Λ P·d."""
    return spec.d * spec.d + spec.n_blocks * spec.p * spec.p + spec.out_features * spec.d


class LazyTensors(MutableMapping[str, torch.Tensor]):
    """One kind of factor (``q_a``, ``q_s`` or ``lam``) per module, read from a factors file when accessed.

    Each access of a module not among the last ``keep`` read opens the file and reads that tensor alone
    (cast to ``dtype`` on ``device``); assigning a module replaces it in memory (the file is unchanged).
    A file that became unreadable raises an :class:`UnreadableFileError` naming it.
    """

    def __init__(self, path: str | Path, kind: str, names: list[str], device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, keep: int = 2) -> None:
        self.path, self.kind, self.names = Path(path), kind, list(names)
        self.device, self.dtype, self.keep = device, dtype, keep
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._set: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._set:
            return self._set[name]
        if name not in self.names:
            raise KeyError(name)
        if name in self._recent:
            self._recent.move_to_end(name)
            return self._recent[name]
        t = read_tensor(self.path, f"{self.kind}/{name}", self.device, self.dtype)
        self._recent[name] = t
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        return t

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if name not in self.names:
            self.names.append(name)
        self._set[name] = value

    def __delitem__(self, name: str) -> None:
        self.names.remove(name)
        self._set.pop(name, None)
        self._recent.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.names))

    def moved(self, device: str | torch.device) -> LazyTensors:
        """The same file's tensors, read onto ``device`` (assigned ones moved now)."""
        out = LazyTensors(self.path, self.kind, self.names, device, self.dtype, self.keep)
        out._set = {k: v.to(device) for k, v in self._set.items()}
        return out

    def __len__(self) -> int:
        return len(self.names)


def finalize(model: nn.Module, specs: list[ModuleSpec], basis: Eigenbasis, lam: LambdaSums,
             settings: FitSettings, extra: dict | None = None) -> Factors:
    """Assemble factors and their manifest from an eigenbasis and Λ sums."""
    if lam.sequences == 0:
        raise ValueError("Λ sums hold no sequences")
    import transformers

    manifest = {
        "fingerprint": fingerprint(model, specs),
        "fingerprint_version": FINGERPRINT_VERSION,
        "model_class": type(model).__name__,
        "tokens": basis.tokens,
        "sequences": lam.sequences,
        "truncated": lam.truncated,
        "settings": asdict(settings),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    } | (extra or {})
    f = Factors({s.name: s for s in specs}, dict(basis.q_a), dict(basis.q_s),
                {n: v / lam.sequences for n, v in lam.lam.items()}, manifest)
    f.check_finite()
    return f


def fit_ekfac(model: nn.Module, specs: list[ModuleSpec], encoded: Encoded, settings: FitSettings | None = None,
              pad_id: int | None = None) -> Factors:
    """Fit EK-FAC factors of ``model`` on ``encoded`` (both passes) and return them."""
    settings = settings or FitSettings()
    t0 = time.perf_counter()
    cache = PassCache(cache_budget(settings, next(model.parameters()).device))
    sums = covariance_sums(model, specs, encoded, settings, pad_id, cache)
    t1 = time.perf_counter()
    basis = eigenbasis(sums, specs, consume=True)  # the sums are not needed again
    t2 = time.perf_counter()
    # how much of the data the Λ pass took from memory instead of a second forward/backward
    cached = {"batches": len(cache.batches), "mib": round(cache.used / 2**20, 1),
              "of_batches": -(-sums.sequences // settings.batch_size), "budget_mib": round(cache.budget / 2**20, 1)}
    lam = lambda_sums(model, specs, encoded, basis, settings, pad_id, cache)
    f = finalize(model, specs, basis, lam, settings,
                 {"fit_seconds": round(time.perf_counter() - t0, 3), "eigh_seconds": round(t2 - t1, 3),
                  "pass_cache": cached})
    log.info("fitted EK-FAC on %d sequences / %d tokens in %.1fs", lam.sequences, basis.tokens,
             time.perf_counter() - t0)
    return f


def merge_all(parts: Iterable):
    """Merge a non-empty iterable of ``CovarianceSums`` or ``LambdaSums``."""
    it = iter(parts)
    total = next(it)
    for p in it:
        total = total.merge(p)
    return total


# ---------------------------------------------------------------- atomic files

def _atomic_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, meta: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensor_dir(directory: str | Path, tensor_file: str, tensors: dict[str, torch.Tensor],
                    manifest: dict) -> Path:
    """Write ``tensor_file`` (safetensors) and ``manifest.json`` as a new ``directory``, atomically: built
    in a temporary sibling and renamed into place, so a failure leaves the previous directory intact."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / tensor_file))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


class UnreadableFileError(ValueError):
    """A stored file (safetensors, manifest) that cannot be read: truncated, altered or not ours."""


def read_json(path: str | Path) -> dict:
    """A JSON manifest; an :class:`UnreadableFileError` naming it when it does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableFileError(f"{path} is unreadable ({e}); it was truncated or altered") from e


@contextmanager
def _open_safetensors(path: str | Path, device: str | torch.device = "cpu"):
    """``safe_open`` of ``path``; FileNotFoundError or an :class:`UnreadableFileError` naming the file when it
    is missing, truncated or not safetensors (also for errors while reading inside the ``with``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            yield f
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UnreadableFileError(f"{path} is unreadable ({e}); it was truncated or altered") from e


def read_tensors(path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata (cast one tensor at a time to ``dtype``, if given);
    errors as :func:`_open_safetensors`."""
    with _open_safetensors(path, device) as f:
        meta = f.metadata() or {}
        return {k: f.get_tensor(k) if dtype is None else f.get_tensor(k).to(dtype) for k in f.keys()}, meta


def tensor_keys(path: str | Path) -> set[str]:
    """The tensor names of a safetensors file (its header only)."""
    with _open_safetensors(path) as f:
        return set(f.keys())


def read_tensor(path: str | Path, key: str, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of a safetensors file; a missing key names the file."""
    with _open_safetensors(path, device) as f:
        if key not in f.keys():
            raise UnreadableFileError(f"{path} has no tensor {key!r}; it was altered or written for other "
                                      f"modules: refit it")
        t = f.get_tensor(key)
    return t if dtype is None else t.to(dtype)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished temporary directory into place, replacing an older one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
