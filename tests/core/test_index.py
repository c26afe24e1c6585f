"""The influence index against explicit computation: unprojected, ⟨ψ, φ⟩ is MS-IF exactly (whitened and
plain), in the paper's ⟨P_ft ∇m, P_pt ∇ℓ⟩ form with explicit block inverses; the projection is seeded,
unbiased and the same for both sides; search is exact top-k; manifests refuse a mismatched index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.core import ARCHS, PAD, explicit_precondition, one_thread, rel_err  # noqa: F401  (autouse fixture)
from helpers.scoring import DAMP_FT, DAMP_PT, world

from msif_core.index import (
    IndexMismatchError,
    Projection,
    check_manifest,
    document_norms,
    document_vectors,
    encode_rows,
    index_manifest,
    index_scores,
    pair_scores,
    query_vectors,
    score_scale,
    search,
    unit_rows,
)
from msif_core.query import measurement_gradients


def _vectors(w, projection, whiten):
    grads = measurement_gradients(w.ft, w.specs, w.queries, batch_size=2, pad_id=PAD)
    psi = query_vectors(grads, w.specs, w.ft_f, w.pt_f, projection, DAMP_FT, DAMP_PT, whiten)
    dv = document_vectors(w.pt, w.specs, w.docs, w.pt_f, projection, DAMP_PT, whiten, batch_size=3,
                          pad_id=PAD, out_dtype=torch.float64)
    return psi, dv.vectors, dv.sq_norms


@pytest.mark.parametrize("arch, whiten", [(a, True) for a in ARCHS] + [("gpt_neox", False), ("llama", False)])
def test_unprojected_index_is_exact_ms_if(arch, whiten):
    """Π = identity: ⟨ψ, φ⟩ = ⟨P_ft ∇m(θ_ft), P_pt ∇ℓ(z; θ_pt)⟩ from explicit block inverses (float64)."""
    w = world(arch)
    gm, gz = w.stack(w.grad_m), w.stack(w.grad_pt)
    want = w.explicit({n: explicit_precondition(w.ft_f, n, gm[n], DAMP_FT) for n in w.names},
                      {n: explicit_precondition(w.pt_f, n, gz[n], DAMP_PT) for n in w.names})
    proj = Projection(w.specs, None)
    assert proj.dimensions == sum(s.out_features * s.d for s in w.specs)
    psi, phi, sq = _vectors(w, proj, whiten)
    scores, parts = index_scores(psi, phi, proj)
    assert scores.shape == (len(w.docs), len(w.queries))
    assert rel_err(scores, want) < 1e-7  # float64; the square roots of Λ + λ cost a digit on mpt
    assert set(parts) <= {"mlp", "mha"}
    mlp = [s.name for s in w.specs if all(b.kind == "mlp" for b in s.blocks)]  # the MLP share, explicitly
    want_mlp = sum(torch.einsum("npd,qpd->nq", explicit_precondition(w.pt_f, n, gz[n], DAMP_PT).double(),
                                explicit_precondition(w.ft_f, n, gm[n], DAMP_FT).double()) for n in mlp).numpy()
    assert rel_err(parts["mlp"], want_mlp) < 1e-7
    # the pass's exact squared norms: the self-influence ∇ℓᵀ P_pt ∇ℓ (whitened) or ‖∇ℓ‖² (plain)
    if whiten:
        want_sq = np.array([sum(float((gz[n][i] * explicit_precondition(w.pt_f, n, gz[n][i], DAMP_PT)).sum())
                                for n in w.names) for i in range(len(w.docs))])
    else:
        want_sq = np.array([sum(float((gz[n][i] ** 2).sum()) for n in w.names) for i in range(len(w.docs))])
    assert rel_err(sq, want_sq) < 1e-8 and rel_err((phi * phi).sum(1), want_sq) < 1e-8
    norms = document_norms(w.pt, w.specs, w.docs, w.pt_f, DAMP_PT, batch_size=2, pad_id=PAD)
    assert rel_err(norms.self_influence if whiten else norms.grad_sq, want_sq) < 1e-8


@pytest.mark.parametrize("arch, whiten", [("gpt_neox", True), ("gpt_neox", False), ("llama", True)])
def test_unprojected_index_answers_gdp_exactly(arch, whiten):
    """The same document vectors with the GDP query vectors (Π W⁻¹ ∇m, no fine-tune factors) give the
    gradient dot product ∇m(x; θ_ft)ᵀ ∇ℓ(z; θ_pt), summed explicitly over the analysed modules (float64);
    projected, the plain (rotated, balanced) index estimates it; the whitened one's GDP vectors carry
    (Λ + λ)^(+1/2) against the documents' (Λ + λ)^(-1/2), so its projection error is larger (bench/index_quality.py
    --gdp measures it)."""
    w = world(arch)
    gm, gz = w.stack(w.grad_m), w.stack(w.grad_pt)
    want = sum(torch.einsum("npd,qpd->nq", gz[n].double(), gm[n].double()) for n in w.names).numpy()
    grads = measurement_gradients(w.ft, w.specs, w.queries, batch_size=2, pad_id=PAD)
    for proj, tol in ((Projection(w.specs, None), 1e-7),) + (((Projection(w.specs, 4096, seed=3), 0.35),)
                                                              if not whiten else ()):
        psi = query_vectors(grads, w.specs, None, w.pt_f, proj, damping_pt=DAMP_PT, whiten=whiten, method="gdp")
        phi = document_vectors(w.pt, w.specs, w.docs, w.pt_f, proj, DAMP_PT, whiten, batch_size=3, pad_id=PAD,
                               out_dtype=torch.float64).vectors
        scores, _ = index_scores(psi, phi, proj)
        assert rel_err(scores, want) < tol, (proj.dimensions, rel_err(scores, want))
    with pytest.raises(ValueError, match="ft_factors"):
        query_vectors(grads, w.specs, None, w.pt_f, proj)


def test_projection_is_seeded_unbiased_and_sized():
    w = world("gpt_neox")
    total = sum(s.out_features * s.d for s in w.specs)
    a, b = Projection(w.specs, 500, seed=3), Projection(w.specs, 500, seed=3)
    assert 0.5 * 500 < a.dimensions < 1.5 * 500 < total
    name = w.specs[0].name
    assert all(torch.equal(x, y) for x, y in zip(a.matrices(name, "cpu", torch.float64),
                                                  b.matrices(name, "cpu", torch.float64)))
    c = Projection(w.specs, 500, seed=4)
    assert not torch.equal(a.matrices(name, "cpu", torch.float64)[0], c.matrices(name, "cpu", torch.float64)[0])
    assert a.manifest() == b.manifest() and a.manifest() != c.manifest()
    # E[⟨Πx, Πy⟩] = ⟨x, y⟩: the mean over seeds of projected inner products approaches the exact one
    s = w.specs[0]
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(1, s.n_blocks, s.p, s.d, generator=g, dtype=torch.float64) for _ in range(2))
    y = 0.7 * x + 0.3 * y  # correlated, so the inner product is far from zero
    exact = float((x * y).sum())
    est = [float((p.apply(s.name, x) * p.apply(s.name, y)).sum())
           for p in (Projection([s], 20, seed=k) for k in range(400))]
    assert abs(np.mean(est) - exact) < 4 * np.std(est) / np.sqrt(len(est))
    assert np.std(est) > 0.01 * abs(exact)  # the projection does lose something at 20 numbers


def test_more_dimensions_follow_exact_ms_if_more_closely():
    """The projected scores' error (relative Frobenius, mean over seeds) falls as the dimensions grow; at
    all the parameters the index is exact again. (How well it ranks at realistic sizes is measured on the
    demo world: bench/index_quality.py.)"""
    w = world("gpt_neox")
    psi0, phi0, _ = _vectors(w, Projection(w.specs, None), True)
    exact = phi0 @ psi0.T

    def err(k: int) -> float:
        out = []
        for seed in range(3):
            psi, phi, _ = _vectors(w, Projection(w.specs, k, seed=seed), True)
            out.append(np.linalg.norm(phi @ psi.T - exact) / np.linalg.norm(exact))
        return float(np.mean(out))

    small, large = err(64), err(1024)
    assert large < 0.7 * small
    total = sum(s.out_features * s.d for s in w.specs)
    psi, phi, _ = _vectors(w, Projection(w.specs, total, seed=5), True)
    assert rel_err(phi @ psi.T, exact) < 1e-10


def test_search_is_exact_top_k_in_any_number_of_steps():
    rng = np.random.default_rng(0)
    docs, queries = rng.standard_normal((1000, 16)), rng.standard_normal((7, 16))
    full = queries @ docs.T
    want = np.argsort(-full, axis=1)[:, :10]
    for step in (64, 333, 100_000):
        idx, sc = search(queries, docs, 10, rows_per_step=step)
        assert np.array_equal(idx, want), step
        assert np.allclose(sc, np.take_along_axis(full, want, 1), rtol=1e-5)
    idx, _ = search(queries, docs[:4], 10)
    assert idx.shape == (7, 4)
    u = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(u, [[0.6, 0.8], [0.0, 0.0]])
    assert np.allclose(unit_rows(np.array([[3.0, 4.0]]), np.array([100.0])), [[0.3, 0.4]])


def test_float16_rows_and_pair_scores_against_explicit_products():
    """float16 storage: unit rows and float32 norms (no overflow however large the vectors); search over them
    finds the explicit top k of the float64 products, and pair_scores gives those products (and each block
    kind's share) for the chosen pairs only."""
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((500, 24)) * rng.uniform(1, 1e6, (500, 1))  # norms far beyond float16's range
    docs[3] = 0.0  # a document without gradient
    queries = rng.standard_normal((5, 24))
    full = queries @ docs.T
    stored, norms = encode_rows(docs, "float16")
    assert stored.dtype == np.float16 and norms.dtype == np.float32 and np.isfinite(stored).all()
    assert np.abs(stored.astype(np.float64) * norms[:, None] - docs).max() < 1e-3 * np.abs(docs).max()
    same, none = encode_rows(docs, "float32")
    assert same.dtype == np.float32 and none is None
    with pytest.raises(ValueError, match="float32 or float16"):
        encode_rows(docs, "int8")
    idx, _ = search(queries, stored, 20, rows_per_step=128, row_scale=norms)
    want = np.argsort(-full, axis=1)[:, :20]
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(idx, want, strict=True)]) > 0.95  # near ties
    exact, _ = pair_scores(queries, docs, want)
    assert np.allclose(exact, np.take_along_axis(full, want, 1), rtol=1e-12)
    half, _ = pair_scores(queries, stored, want, row_scale=norms)
    assert np.abs(half - exact).max() < 2e-3 * np.abs(exact).max()
    # cosine scores: every document's row of unit length, whichever way it is stored; a zero row scores 0
    unit = docs / np.maximum(np.linalg.norm(docs, axis=1, keepdims=True), 1e-300)
    for rows, scale in ((same, none), (stored, norms)):
        cos, _ = pair_scores(queries, rows, want, row_scale=score_scale(rows, scale, cosine=True))
        assert np.abs(cos - np.take_along_axis(queries @ unit.T, want, 1)).max() < 2e-3
        dot, _ = pair_scores(queries, rows, want, row_scale=score_scale(rows, scale, cosine=False))
        assert np.abs(dot - exact).max() < 2e-3 * np.abs(exact).max()
    assert score_scale(same, none, cosine=True)[3] == 0.0
    w = world("gpt_neox")  # the block kinds' parts of the chosen pairs: those of the full products
    proj = Projection(w.specs, 300, seed=2)
    psi, phi, _ = _vectors(w, proj, True)
    all_scores, all_parts = index_scores(psi, phi, proj)
    pos = np.argsort(-all_scores.T, axis=1)[:, :3]
    got, parts = pair_scores(psi, phi, pos, proj)
    assert np.allclose(got, np.take_along_axis(all_scores.T, pos, 1), rtol=1e-10)
    assert parts.keys() == all_parts.keys() and len(parts) == 2
    for kind, p in parts.items():
        assert np.allclose(p, np.take_along_axis(all_parts[kind].T, pos, 1), rtol=1e-10, atol=1e-12)


def test_a_mismatched_index_is_refused_by_name():
    w = world("gpt_neox")
    proj = Projection(w.specs, 256, seed=0)
    built = index_manifest(w.pt_f, proj, DAMP_PT, whiten=True)
    check_manifest(built, index_manifest(w.pt_f, Projection(w.specs, 256, seed=0), DAMP_PT, True), "shard 0")
    for other, field in ((index_manifest(w.pt_f, Projection(w.specs, 256, seed=1), DAMP_PT, True), "seed"),
                         (index_manifest(w.pt_f, Projection(w.specs, 512, seed=0), DAMP_PT, True), "dimensions"),
                         (index_manifest(w.pt_f, proj, 1e-2, True), "damping_pt"),
                         (index_manifest(w.ft_f, proj, DAMP_PT, True), "pretrained"),
                         (index_manifest(w.pt_f, proj, DAMP_PT, False), "whiten")):
        with pytest.raises(IndexMismatchError, match=f"shard 0 .*{field}"):
            check_manifest(built, other, "shard 0")
    # the plain index does not depend on the pre-train damping
    check_manifest(index_manifest(w.pt_f, proj, DAMP_PT, False), index_manifest(w.pt_f, proj, 1e-2, False), "x")
