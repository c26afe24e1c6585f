"""Exact influence reference for judging approximation quality (paper section 5.1, appendix C.2).

Single stage, one model. The analysed parameters θ are a given list of parameter names (the weights and
biases of the chosen linear modules); every other parameter is held fixed. The curvature is the
Gauss-Newton matrix of the fitting data,

    G = (1/N) Σ_n J_nᵀ H_n J_n,

where n runs over the N *sequences* of the fitting data, J_n is the Jacobian of sequence n's logits at its
prediction positions (the logits at t−1 of every target token t) with respect to θ, and H_n is the Hessian
of sequence n's *summed* next-token cross-entropy with respect to those logits: one block
``diag(p) − p pᵀ`` per prediction position, ``p = softmax(logits)``. This is the normalisation EK-FAC uses
(SPEC section 3: Λ is a mean over sequences of per-sequence summed-loss gradients squared), so exact and
EK-FAC scores are on the same scale for a given damping λ.

Gauss-Newton-vector products are computed exactly with ``torch.func`` (``jvp`` then ``vjp``), and
``(G + λI)⁻¹`` is applied by full-batch conjugate gradient run to convergence (:func:`cg_solve`). Scores are

    score(z, x) = ∇ℓ(z)ᵀ (G + λI)⁻¹ ∇m(x)

with ℓ(z) the summed cross-entropy of candidate z's target tokens and m(x) the summed cross-entropy of
query x's target (completion) tokens; positive = z supports x's completion (rank descending).

Flat parameter vectors follow the order of the given ``param_names`` (each tensor flattened row-major).
Only causal-LM targets (``Encoded.loss_mask``) are supported, not classification labels.

Why one file of ~500 lines: every brute-force reference (Gauss-Newton products, CG, the
explicit block inverses) is short and they are used together by the tests and the approximation bench;
apart they would only import each other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from msif_core.data import Batch, Encoded, collate, iter_batches

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Parameters


def param_names_for_modules(model: torch.nn.Module, module_names: Sequence[str]) -> list[str]:
    """The ``weight`` and ``bias`` parameter names of the named modules, in the order given."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    out = []
    for m in module_names:
        if m not in modules:
            raise ValueError(f"model has no module named {m!r}")
        for suffix in ("weight", "bias"):
            name = f"{m}.{suffix}" if m else suffix
            if name in params:
                out.append(name)
    return out


@dataclass
class ParamLayout:
    """Names, shapes and sizes of the analysed parameters: the layout of flat parameter vectors."""

    names: list[str]
    shapes: list[torch.Size]
    numels: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.numels = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    @property
    def n_params(self) -> int:
        """Length of a flat vector."""
        return sum(self.numels)

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors (dict by name, or a sequence in layout order) into ``[P]``."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``[P]`` vector into per-parameter views (usable under ``vmap``)."""
        parts = torch.split(flat, self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}


def _split_params(model: torch.nn.Module, param_names: Sequence[str]
                  ) -> tuple[ParamLayout, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(layout, analysed parameters, fixed parameters), all detached from the model's autograd graph."""
    names = list(param_names)
    if not names:
        raise ValueError("param_names is empty: nothing to analyse")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names given twice: {dup}")
    all_params = dict(model.named_parameters())
    missing = [n for n in names if n not in all_params]
    if missing:
        raise ValueError(f"model has no parameters named {missing}")
    params = {n: all_params[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in all_params.items() if n not in params}
    layout = ParamLayout(names, [p.shape for p in params.values()])
    return layout, params, fixed


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    flag = model.training
    try:
        model.eval()
        yield
    finally:
        model.train(flag)


def _check_lm(encoded: Encoded, what: str) -> None:
    if encoded.labels is not None:
        raise ValueError(f"{what}: classification labels are not supported by the exact reference "
                         "(it handles causal-LM targets given by loss_mask)")


# ----------------------------------------------------------------------------------------------------
# Losses and gradients


def _prediction_logits(model: torch.nn.Module, weights: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """Logits at positions 0..T−2, which predict tokens 1..T−1: ``[B, T−1, V]``."""
    out = functional_call(model, weights, args=(),
                          kwargs={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    return out.logits[:, :-1]


def _summed_ce(pred_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-sequence summed cross-entropy over target tokens, ``[B]``."""
    logp = torch.log_softmax(pred_logits, dim=-1)
    nll = -logp.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (nll * batch.loss_mask[:, 1:].to(nll.dtype)).sum(-1)


def _iter_sequence_gradients(model: torch.nn.Module, param_names: Sequence[str], encoded: Encoded,
                             measure: str = "loss", pad_id: int = 0) -> Iterator[torch.Tensor]:
    """Flat gradient ``[P]`` of each example's summed target cross-entropy, one example at a time."""
    if measure != "loss":
        raise ValueError(f"unknown measure {measure!r}; supported: 'loss' (summed target cross-entropy)")
    _check_lm(encoded, "sequence_gradients")
    layout, params, fixed = _split_params(model, param_names)
    device, _ = _device_dtype(model)
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    with _eval_mode(model):
        for i in range(len(encoded)):
            batch = collate(encoded, [i], pad_id).to(device)
            loss = _summed_ce(_prediction_logits(model, {**fixed, **leaves}, batch), batch)[0]
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            yield layout.flatten([torch.zeros_like(p) if g is None else g
                                  for g, p in zip(grads, leaves.values())]).detach()


def sequence_gradients(model: torch.nn.Module, param_names: Sequence[str], encoded: Encoded,
                       measure: str = "loss", pad_id: int = 0) -> torch.Tensor:
    """Per-example gradients ``[n_examples, P]`` of the summed target cross-entropy.

    Computed by a plain loop: one unpadded forward and backward pass per example. ``P`` is the total
    size of ``param_names``; columns follow their order (each tensor flattened row-major). For a document
    the targets are all tokens but the first (ℓ_pt); for a (prompt, completion) pair the completion
    tokens (m). Only ``measure="loss"`` is supported.
    """
    layout, _, _ = _split_params(model, param_names)
    device, dtype = _device_dtype(model)
    out = torch.zeros((len(encoded), layout.n_params), dtype=dtype, device=device)
    for i, g in enumerate(_iter_sequence_gradients(model, param_names, encoded, measure, pad_id)):
        out[i] = g
    return out


# ----------------------------------------------------------------------------------------------------
# Gauss-Newton-vector products


class GaussNewtonOperator:
    """The exact Gauss-Newton-vector product ``v ↦ G v`` on a fitting set (see the module docstring).

    ``v`` is a flat vector ``[P]`` or a matrix of column vectors ``[P, K]``; the result has the same
    shape. Each call makes one pass over the fitting data: per batch one ``jvp`` (J v, vectorised over
    columns with ``vmap``), the softmax Hessian of every target position, and one ``vjp`` (Jᵀ·). Padding
    and non-target positions get a zero Hessian. Attention runs on PyTorch's math SDPA kernel (the
    fused CPU kernels have no forward-mode derivative).

    Args:
        model: the model; its analysed parameters are read when the operator is built.
        param_names: the analysed parameters.
        fit_encoded: the fitting data (N sequences; G averages over all of them).
        batch_size: sequences per batch.
        max_columns: columns pushed through one jvp/vjp at once (bounds memory: K·B·T·V logits).
        pad_id: the id written into padding (masked out anyway).
    """

    def __init__(self, model: torch.nn.Module, param_names: Sequence[str], fit_encoded: Encoded, *,
                 batch_size: int = 16, max_columns: int = 16, pad_id: int = 0) -> None:
        _check_lm(fit_encoded, "GaussNewtonOperator")
        if len(fit_encoded) == 0:
            raise ValueError("the fitting data is empty")
        if max_columns < 1:
            raise ValueError(f"max_columns must be positive, got {max_columns}")
        self.model = model
        self.layout, self.params, self.fixed = _split_params(model, param_names)
        self.device, self.dtype = _device_dtype(model)
        self.batches = [b.to(self.device) for b in iter_batches(fit_encoded, batch_size, pad_id)]
        self.n_sequences = len(fit_encoded)
        self.n_targets = int(sum(b.loss_mask.sum() for b in self.batches))
        self.max_columns = max_columns
        self.n_calls = 0

    @property
    def n_params(self) -> int:
        """Number of analysed parameters P."""
        return self.layout.n_params

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def _batch_product(self, batch: Batch, cols: torch.Tensor) -> torch.Tensor:
        """Σ_{n in batch} J_nᵀ H_n J_n applied to ``cols`` ``[K, P]`` → ``[K, P]``."""

        def logits_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return _prediction_logits(self.model, {**self.fixed, **p}, batch)

        def jv(t: torch.Tensor) -> torch.Tensor:
            return jvp(logits_fn, (self.params,), (self.layout.unflatten(t),))[1]

        logits, vjp_fn = vjp(logits_fn, self.params)
        jvs = vmap(jv)(cols)  # [K, B, T-1, V]
        p = torch.softmax(logits.detach(), dim=-1)
        hjv = p * jvs - p * (p * jvs).sum(-1, keepdim=True)
        hjv = hjv * batch.loss_mask[:, 1:, None].to(hjv.dtype)
        (grads,) = vmap(vjp_fn)(hjv)
        return torch.cat([grads[n].reshape(cols.shape[0], -1) for n in self.layout.names], dim=1)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` for ``v`` of shape ``[P]`` or ``[P, K]``."""
        squeeze = v.ndim == 1
        cols = (v[None, :] if squeeze else v.T).to(device=self.device, dtype=self.dtype).detach()
        if cols.shape[1] != self.n_params:
            raise ValueError(f"vector has {cols.shape[1]} entries, the analysed parameters {self.n_params}")
        out = torch.zeros_like(cols)
        with _eval_mode(self.model), sdpa_kernel(SDPBackend.MATH):
            for batch in self.batches:
                for s in range(0, cols.shape[0], self.max_columns):
                    out[s:s + self.max_columns] += self._batch_product(batch, cols[s:s + self.max_columns])
        out /= self.n_sequences
        self.n_calls += 1
        out = out.to(v.device)
        return out[0] if squeeze else out.T


def gnvp(model: torch.nn.Module, param_names: Sequence[str], fit_encoded: Encoded, v: torch.Tensor,
         batch_size: int = 16) -> torch.Tensor:
    """One exact Gauss-Newton-vector product ``G v`` (see :class:`GaussNewtonOperator`)."""
    return GaussNewtonOperator(model, param_names, fit_encoded, batch_size=batch_size)(v)


# ----------------------------------------------------------------------------------------------------
# Conjugate gradient


@dataclass
class CGResult:
    """Outcome of :func:`cg_solve`.

    Attributes:
        x: the solution, shaped like ``b``.
        iterations: CG iterations per column.
        residuals: final relative residual ``‖b − (G + λI) x‖ / ‖b‖`` per column, recomputed with one
            extra product (not the recursively updated residual).
        converged: whether every column reached ``tol`` (on the recursive residual).
        time_s: wall-clock seconds.
        n_matvecs: calls to ``matvec`` (each a full pass over the fitting data for the exact operator).
    """

    x: torch.Tensor
    iterations: list[int]
    residuals: list[float]
    converged: bool
    time_s: float
    n_matvecs: int


def cg_solve(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, damping: float,
             tol: float = 1e-8, max_iter: int = 1000, log_every: int = 50,
             preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None) -> CGResult:
    """Solve ``(G + λI) x = b`` by conjugate gradient, with ``matvec(v) = G v`` and λ = ``damping``.

    ``b`` is a flat vector ``[P]`` or ``[P, K]`` (K independent right-hand sides, each with its own CG
    step sizes; ``matvec`` receives the still-active columns ``[P, k]``). A column stops when its
    recursive residual satisfies ``‖r‖ ≤ tol · ‖b‖``; ``x₀ = 0``. G must be symmetric positive
    semi-definite and ``damping ≥ 0``.

    ``preconditioner``, if given, applies a fixed symmetric positive definite ``M⁻¹ ≈ (G + λI)⁻¹`` to
    columns ``[P, k]`` (preconditioned CG): the same solution, in fewer products with G when M is close
    to G + λI (e.g. :func:`ekfac_preconditioner`). The stopping rule stays on the true residual ``r``.
    """
    if damping < 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    t0 = time.perf_counter()
    squeeze = b.ndim == 1
    B = b[:, None] if squeeze else b
    B = B.detach()
    n_cols = B.shape[1]
    x = torch.zeros_like(B)
    r = B.clone()
    z = r.clone() if preconditioner is None else preconditioner(r)
    p = z.clone()
    rz = (r * z).sum(0)  # r·M⁻¹r (r·r without a preconditioner)
    rs = (r * r).sum(0)
    bnorm = B.norm(dim=0)
    iters = [0] * n_cols
    n_matvecs = 0

    def apply(cols: torch.Tensor) -> torch.Tensor:
        return matvec(cols) + damping * cols

    active = rs.sqrt() > tol * bnorm
    for it in range(max_iter):
        if not bool(active.any()):
            break
        idx = torch.nonzero(active).squeeze(1)
        p_a = p[:, idx]
        Ap = apply(p_a)
        n_matvecs += 1
        pAp = (p_a * Ap).sum(0)
        if bool((pAp <= 0).any()):
            raise ValueError("CG met a direction with non-positive curvature: G + λI is not positive "
                             "definite (use a positive damping)")
        alpha = rz[idx] / pAp
        x[:, idx] += alpha * p_a
        r[:, idx] -= alpha * Ap
        r_a = r[:, idx]
        z_a = r_a if preconditioner is None else preconditioner(r_a)
        rz_new = (r_a * z_a).sum(0)
        p[:, idx] = z_a + (rz_new / rz[idx]) * p_a
        rz[idx] = rz_new
        rs[idx] = (r_a * r_a).sum(0)
        for c in idx.tolist():
            iters[c] += 1
        active = rs.sqrt() > tol * bnorm
        if log_every and (it + 1) % log_every == 0:
            rel = (rs.sqrt() / bnorm.clamp_min(torch.finfo(B.dtype).tiny)).max().item()
            log.info("CG iteration %d: %d of %d columns active, max relative residual %.3e",
                     it + 1, int(active.sum()), n_cols, rel)
    converged = not bool(active.any())
    true_res = (B - apply(x)).norm(dim=0) / bnorm.clamp_min(torch.finfo(B.dtype).tiny)
    n_matvecs += 1
    result = CGResult(x=x[:, 0] if squeeze else x, iterations=iters, residuals=true_res.tolist(),
                      converged=converged, time_s=time.perf_counter() - t0, n_matvecs=n_matvecs)
    (log.info if converged else log.warning)(
        "CG %s after %d iterations (max over %d columns) in %.1f s; relative residual max %.3e",
        "converged" if converged else "did NOT converge", max(iters, default=0), n_cols, result.time_s,
        max(result.residuals, default=0.0))
    return result


def ekfac_preconditioner(model: torch.nn.Module, param_names: Sequence[str], factors, damping: float | str
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """EK-FAC's iHVP as a CG preconditioner on flat vectors laid out like ``param_names``.

    Each analysed module's weight (and bias) entries of a column are gathered into its [P, d] block
    matrix (bias as last column; GPT-2 ``Conv1D`` weights transposed), preconditioned with
    ``factors.precondition`` and scattered back; entries of parameters outside the factors' modules
    pass through unchanged. ``factors`` is a :class:`msif_core.ekfac.Factors`.
    """
    layout, _, _ = _split_params(model, param_names)
    offsets = dict(zip(layout.names, np.cumsum([0] + layout.numels[:-1]).tolist()))
    shapes = dict(zip(layout.names, layout.shapes))
    plan = []  # (spec, weight offset, weight shape, bias offset or None)
    for name, spec in factors.specs.items():
        w, b = f"{name}.weight", f"{name}.bias"
        if w not in offsets:
            raise ValueError(f"the factors' module {name} has no weight among the analysed parameters")
        if spec.has_bias and b not in offsets:
            raise ValueError(f"the factors of {name} include a bias column but {b} is not analysed")
        plan.append((spec, offsets[w], shapes[w], offsets[b] if spec.has_bias else None))

    def apply(cols: torch.Tensor) -> torch.Tensor:
        out = cols.clone()
        k = cols.shape[1]
        for spec, wo, wshape, bo in plan:
            n_w = int(np.prod(wshape))
            w = cols[wo:wo + n_w].T.reshape(k, *wshape)
            if spec.layout == "conv1d":
                w = w.transpose(1, 2)
            m = w if bo is None else torch.cat([w, cols[bo:bo + spec.out_features].T[:, :, None]], dim=2)
            pm = factors.precondition(spec.name, m, damping)  # [k, P, d]
            pw = pm[:, :, :-1] if bo is not None else pm
            if spec.layout == "conv1d":
                pw = pw.transpose(1, 2)
            out[wo:wo + n_w] = pw.reshape(k, n_w).T
            if bo is not None:
                out[bo:bo + spec.out_features] = pm[:, :, -1].T
        return out

    return apply


# ----------------------------------------------------------------------------------------------------
# Influence


@dataclass
class ExactInfluenceResult:
    """Scores ``[n_candidates, n_queries]`` with the CG solve that produced them (None for GDP)."""

    scores: np.ndarray
    cg: CGResult | None
    time_s: float


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def score_candidates(model: torch.nn.Module, param_names: Sequence[str], candidate_encoded: Encoded,
                     directions: torch.Tensor, pad_id: int) -> np.ndarray:
    """``[n_candidates, K]`` = candidate gradients · directions ``[P, K]``, streamed (no gradient kept)."""
    out = np.zeros((len(candidate_encoded), directions.shape[1]), dtype=np.float64)
    device, dtype = _device_dtype(model)
    directions = directions.to(device=device, dtype=dtype)
    for i, g in enumerate(_iter_sequence_gradients(model, param_names, candidate_encoded, pad_id=pad_id)):
        out[i] = (g @ directions).double().cpu().numpy()
        if (i + 1) % 100 == 0:
            log.info("candidate gradients: %d of %d", i + 1, len(candidate_encoded))
    return out


def exact_influence_details(
    model: torch.nn.Module,
    param_names: Sequence[str],
    fit_encoded: Encoded | None,
    query_encoded: Encoded,
    candidate_encoded: Encoded,
    damping: float | None,
    *,
    tol: float | None = None,
    max_iter: int = 2000,
    batch_size: int = 16,
    max_columns: int = 16,
    pad_id: int = 0,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ExactInfluenceResult:
    """:func:`exact_influence` with the CG result and timing. ``damping=None`` gives GDP."""
    t0 = time.perf_counter()
    _check_lm(query_encoded, "queries")
    _check_lm(candidate_encoded, "candidates")
    q_grads = sequence_gradients(model, param_names, query_encoded, pad_id=pad_id)  # [Q, P]
    cg = None
    if damping is None:
        directions = q_grads.T
    else:
        if fit_encoded is None:
            raise ValueError("fit_encoded is required unless damping is None (GDP)")
        op = GaussNewtonOperator(model, param_names, fit_encoded, batch_size=batch_size,
                                 max_columns=max_columns, pad_id=pad_id)
        log.info("exact iHVP: %d parameters, %d fitting sequences (%d targets), %d queries, damping %g",
                 op.n_params, op.n_sequences, op.n_targets, len(query_encoded), damping)
        cg = cg_solve(op, q_grads.T.contiguous(), damping,
                      tol=_default_tol(op.dtype) if tol is None else tol, max_iter=max_iter,
                      preconditioner=preconditioner)
        directions = cg.x
    scores = score_candidates(model, param_names, candidate_encoded, directions, pad_id)
    return ExactInfluenceResult(scores=scores, cg=cg, time_s=time.perf_counter() - t0)


def exact_influence(
    model: torch.nn.Module,
    param_names: Sequence[str],
    fit_encoded: Encoded | None,
    query_encoded: Encoded,
    candidate_encoded: Encoded,
    damping: float | None,
    *,
    tol: float | None = None,
    max_iter: int = 2000,
    batch_size: int = 16,
    max_columns: int = 16,
    pad_id: int = 0,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Exact single-stage influence ``∇ℓ(z)ᵀ (G + λI)⁻¹ ∇m(x)``, shape ``[n_candidates, n_queries]``.

    G is the exact Gauss-Newton matrix of ``fit_encoded`` (mean over its sequences of per-sequence
    summed-loss GGNs) and λ = ``damping`` (absolute). The query side is preconditioned once by
    full-batch CG (all queries together, to relative residual ``tol``; default 1e-10 in float64, 1e-5
    otherwise), then each candidate's gradient is dotted with the result. ``damping=None`` skips the
    preconditioning: gradient dot product (GDP), and ``fit_encoded`` is not needed. Positive scores mean
    the candidate supports the query's completion; rank descending. ``preconditioner`` speeds up CG
    without changing its solution (see :func:`cg_solve`).
    """
    return exact_influence_details(model, param_names, fit_encoded, query_encoded, candidate_encoded,
                                   damping, tol=tol, max_iter=max_iter, batch_size=batch_size,
                                   max_columns=max_columns, pad_id=pad_id, preconditioner=preconditioner).scores


def gdp_influence(model: torch.nn.Module, param_names: Sequence[str], query_encoded: Encoded,
                  candidate_encoded: Encoded, *, candidate_model: torch.nn.Module | None = None,
                  pad_id: int = 0) -> np.ndarray:
    """Gradient dot product ``∇ℓ(z; θ_c)ᵀ ∇m(x; θ)``, shape ``[n_candidates, n_queries]``.

    Query gradients come from ``model``; candidate gradients from ``candidate_model`` (default: the same
    model). With θ = θ_ft and θ_c = θ_pt this is the multi-stage GDP of paper eq. 49; the analysed
    parameter names must exist with the same shapes in both models.
    """
    q_grads = sequence_gradients(model, param_names, query_encoded, pad_id=pad_id)
    cmodel = model if candidate_model is None else candidate_model
    layout_c, _, _ = _split_params(cmodel, param_names)
    if layout_c.n_params != q_grads.shape[1]:
        raise ValueError("the analysed parameters differ in size between the query and candidate models")
    return score_candidates(cmodel, param_names, candidate_encoded, q_grads.T, pad_id)
