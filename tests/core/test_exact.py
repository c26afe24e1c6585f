"""The exact influence reference: GNVP against an explicit GGN, CG, per-example gradients, scores."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif_core import exact
from msif_core.data import Encoded

VOCAB = 37
MODULES = [
    "gpt_neox.layers.0.attention.query_key_value",
    "gpt_neox.layers.0.attention.dense",
    "gpt_neox.layers.0.mlp.dense_h_to_4h",
    "gpt_neox.layers.0.mlp.dense_4h_to_h",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: a thread pool only adds contention (and the machine is shared).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=VOCAB, max_position_embeddings=64)
    return GPTNeoXForCausalLM(cfg).double().eval()


def _encoded(n: int, lo: int, hi: int, seed: int, pairs: bool = False) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids, mask = [], []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids.append(torch.randint(0, VOCAB, (length,), generator=g).tolist())
        if pairs:  # prompt then completion: only the completion is a target
            k = max(1, length // 2)
            mask.append([False] * k + [True] * (length - k))
        else:
            mask.append([False] + [True] * (length - 1))
    return Encoded(ids, mask)


@pytest.fixture(scope="module")
def setup():
    model = _model()
    names = exact.param_names_for_modules(model, MODULES)
    # documents and prompt/completion pairs mixed, lengths 3..9: batches are padded
    fit = _encoded(4, 3, 9, seed=1)
    pairs = _encoded(3, 4, 9, seed=2, pairs=True)
    fit = Encoded(fit.input_ids + pairs.input_ids, fit.loss_mask + pairs.loss_mask)
    layout, params, fixed = exact._split_params(model, names)
    return model, names, fit, layout, params, fixed


def _explicit_ggn(model, layout, params, fixed, encoded: Encoded) -> torch.Tensor:
    """(1/N) Σ_n J_nᵀ H_n J_n from full Jacobians (jacrev) and explicit softmax Hessians."""
    flat0 = layout.flatten(params)
    G = torch.zeros(layout.n_params, layout.n_params, dtype=torch.float64)
    for ids, mask in zip(encoded.input_ids, encoded.loss_mask):
        x = torch.tensor([ids])
        target_rows = torch.tensor(mask[1:])  # logits at t-1 predict token t

        def logits(flat, x=x, rows=target_rows):
            out = functional_call(model, {**fixed, **layout.unflatten(flat)}, (), {"input_ids": x}).logits
            return out[0, :-1][rows]

        with sdpa_kernel(SDPBackend.MATH):
            J = jacrev(logits)(flat0)  # [n_targets, V, P]
            p = torch.softmax(logits(flat0), -1)
        for t in range(J.shape[0]):
            H = torch.diag(p[t]) - torch.outer(p[t], p[t])
            G += J[t].T @ H @ J[t]
    return G / len(encoded)


@pytest.fixture(scope="module")
def ggn(setup):
    model, names, fit, layout, params, fixed = setup
    return _explicit_ggn(model, layout, params, fixed, fit)


def test_param_names_and_layout(setup):
    model, names, _, layout, params, _ = setup
    assert names[0] == MODULES[0] + ".weight" and names[1] == MODULES[0] + ".bias"
    assert len(names) == 8
    flat = layout.flatten(params)
    assert flat.shape == (layout.n_params,) == (2160,)
    back = layout.unflatten(flat)
    assert all(torch.equal(back[n], params[n]) for n in names)
    with pytest.raises(ValueError, match="no parameters named"):
        exact.GaussNewtonOperator(model, ["nope.weight"], _encoded(2, 3, 4, 0))
    with pytest.raises(ValueError, match="no module named"):
        exact.param_names_for_modules(model, ["gpt_neox.layers.9.mlp"])


def test_gnvp_equals_explicit_ggn(setup, ggn):
    model, names, fit, *_ = setup
    assert torch.allclose(ggn, ggn.T, atol=1e-10)
    op = exact.GaussNewtonOperator(model, names, fit, batch_size=3)
    V = torch.randn(op.n_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = ggn @ V
    got = op(V)
    assert got.shape == V.shape
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(op(V[:, 0]), expected[:, 0], rtol=1e-9, atol=1e-10)
    assert torch.isfinite(got).all()


def test_padding_does_not_change_gnvp(setup):
    model, names, fit, *_ = setup
    v = torch.randn(exact.GaussNewtonOperator(model, names, fit).n_params, 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(6))
    unpadded = exact.GaussNewtonOperator(model, names, fit, batch_size=1)(v)
    padded = exact.GaussNewtonOperator(model, names, fit, batch_size=len(fit), pad_id=7, max_columns=1)(v)
    torch.testing.assert_close(padded, unpadded, rtol=1e-9, atol=1e-11)
    assert exact.GaussNewtonOperator(model, names, fit, batch_size=len(fit)).batches[0].attention_mask.min() == 0


def test_cg_matches_dense_solve(ggn):
    lam = 1e-3
    A = ggn + lam * torch.eye(ggn.shape[0], dtype=torch.float64)
    b = torch.randn(ggn.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    res = exact.cg_solve(lambda v: ggn @ v, b, lam, tol=1e-11, max_iter=5000)
    assert res.converged and max(res.residuals) < 1e-9
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)
    one = exact.cg_solve(lambda v: ggn @ v, b[:, 1], lam, tol=1e-11, max_iter=5000)
    torch.testing.assert_close(one.x, res.x[:, 1], rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="damping"):
        exact.cg_solve(lambda v: ggn @ v, b, -1.0)


def test_preconditioned_cg_has_the_same_solution(ggn):
    """PCG solves the same system; an exact preconditioner needs one step, an approximate one few."""
    lam = 1e-3
    A = ggn + lam * torch.eye(ggn.shape[0], dtype=torch.float64)
    b = torch.randn(ggn.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    want = torch.linalg.solve(A, b)
    plain = exact.cg_solve(lambda v: ggn @ v, b, lam, tol=1e-11, max_iter=5000)
    near = torch.linalg.inv(A + torch.diag(0.3 * torch.diagonal(A)))  # a nearby SPD matrix's inverse
    approx = exact.cg_solve(lambda v: ggn @ v, b, lam, tol=1e-11, max_iter=5000, preconditioner=lambda r: near @ r)
    inverse = torch.linalg.inv(A)
    perfect = exact.cg_solve(lambda v: ggn @ v, b, lam, tol=1e-11, max_iter=5000,
                             preconditioner=lambda r: inverse @ r)
    for res in (approx, perfect):
        assert res.converged and max(res.residuals) < 1e-9
        torch.testing.assert_close(res.x, want, rtol=1e-7, atol=1e-9)
    assert perfect.iterations == [1, 1]
    assert max(approx.iterations) < max(plain.iterations) / 2


def test_ekfac_preconditioner_is_the_blockwise_ihvp(setup, ggn):
    """On flat vectors: each module's slice preconditioned as its [P, d] block matrix (read back through
    the model's .grad with block_matrix, an independent path), the rest unchanged; and as a CG
    preconditioner it leaves the solution unchanged."""
    from msif_core.ekfac import FitSettings, fit_ekfac
    from msif_core.models import block_matrix, discover_modules

    model, names, fit, layout, *_ = setup
    specs = [s for s in discover_modules(model) if s.name in MODULES[:3]]  # one module left out
    factors = fit_ekfac(model, specs, fit, FitSettings(fisher="empirical", batch_size=3))
    pre = exact.ekfac_preconditioner(model, names, factors, 1e-3)
    cols = torch.randn(layout.n_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    got = pre(cols)
    for k in range(2):
        for n, g in layout.unflatten(cols[:, k]).items():
            dict(model.named_parameters())[n].grad = g.clone()
        out = layout.unflatten(got[:, k])
        for s in specs:
            want = factors.precondition(s.name, block_matrix(model, s, grad=True), 1e-3)
            torch.testing.assert_close(torch.cat([out[s.name + ".weight"], out[s.name + ".bias"][:, None]], 1),
                                       want, rtol=1e-12, atol=1e-12)
        for n in names:
            if n.startswith(MODULES[3]):
                torch.testing.assert_close(out[n], layout.unflatten(cols[:, k])[n])
    model.zero_grad(set_to_none=True)
    b = cols
    plain = exact.cg_solve(lambda v: ggn @ v, b, 1e-2, tol=1e-11, max_iter=5000)
    pcg = exact.cg_solve(lambda v: ggn @ v, b, 1e-2, tol=1e-11, max_iter=5000,
                         preconditioner=exact.ekfac_preconditioner(model, names, factors, 1e-2))
    assert pcg.converged
    torch.testing.assert_close(pcg.x, plain.x, rtol=1e-7, atol=1e-9)


def test_cg_reports_non_convergence():
    M = torch.diag(torch.logspace(-6, 2, 50, dtype=torch.float64))
    res = exact.cg_solve(lambda v: M @ v, torch.ones(50, dtype=torch.float64), 0.0, tol=1e-12, max_iter=3)
    assert not res.converged and res.iterations == [3] and res.residuals[0] > 1e-12


def test_sequence_gradients_match_plain_autograd(setup):
    model, names, _, layout, *_ = setup
    queries = _encoded(3, 4, 8, seed=3, pairs=True)
    grads = exact.sequence_gradients(model, names, queries)
    assert grads.shape == (3, layout.n_params)
    params = dict(model.named_parameters())
    for i, (ids, mask) in enumerate(zip(queries.input_ids, queries.loss_mask)):
        model.zero_grad()
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=x).logits[0], -1)  # float64 (HF's loss upcasts to fp32)
        loss = -sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t])
        loss.backward()
        ref = torch.cat([params[n].grad.reshape(-1) for n in names])
        torch.testing.assert_close(grads[i], ref, rtol=1e-9, atol=1e-11)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="classification"):
        exact.sequence_gradients(model, names, Encoded([[1, 2]], [[False, False]], labels=[0]))


def test_exact_influence_and_gdp_equal_explicit(setup, ggn):
    model, names, fit, *_ = setup
    queries = _encoded(2, 4, 8, seed=3, pairs=True)
    cands = _encoded(4, 3, 8, seed=4)
    lam = 0.05
    res = exact.exact_influence_details(model, names, fit, queries, cands, lam)
    gq = exact.sequence_gradients(model, names, queries)
    gc = exact.sequence_gradients(model, names, cands)
    A = ggn + lam * torch.eye(ggn.shape[0], dtype=torch.float64)
    expected = (gc @ torch.linalg.solve(A, gq.T)).numpy()
    assert res.scores.shape == (4, 2) and res.cg is not None and res.cg.converged
    np.testing.assert_allclose(res.scores, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())

    gdp = exact.exact_influence(model, names, None, queries, cands, None)
    np.testing.assert_allclose(gdp, (gc @ gq.T).numpy(), rtol=1e-10)

    # multi-stage GDP: candidate gradients from another model with the same architecture
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    gc_other = exact.sequence_gradients(other, names, cands)
    np.testing.assert_allclose(exact.gdp_influence(model, names, queries, cands, candidate_model=other),
                               (gc_other @ gq.T).numpy(), rtol=1e-10)
