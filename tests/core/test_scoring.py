"""Scores against explicit computation: measurement gradients, SS-IF, MS-IF (the paper's
⟨P_ft ∇m, P_pt ∇ℓ⟩ with two models and their own factors), GDP, both fused contractions, rank-r
query iHVPs, invariance to batch size and padding, per-block scores, save/load round trips, a
fine-tune whose head was replaced by a classifier, and the one-call API.

Why one file of ~410 lines: every scoring path (methods, contractions, ranks, the one-call API) is
checked here against the same brute-force world (:mod:`helpers.scoring`).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.core import (
    ARCHS,
    FIRST_TOKEN,
    PAD,
    VOCAB,
    explicit_precondition,
    lm_loss,
    loss_closures,
    one_thread,  # noqa: F401  (autouse fixture)
    perturbed_copy,
    random_docs,
    random_pairs,
    rel_err,
    sequence_grads,
    tiny_model,
    tol_for,
    with_labels,
)
from helpers.scoring import DAMP_FT, DAMP_PT, FULL_RANK, world

from msif_core.api import AttributionSettings, attribute, fit_stage_factors, load_stages, score_method
from msif_core.baselines import bm25_scores, repsim_scores
from msif_core.data import encode_documents, encode_pairs
from msif_core.ekfac import Factors, fit_ekfac
from msif_core.models import discover_blocks, discover_modules, fingerprint
from msif_core.query import QueryIHVPs, measurement_gradients, query_ihvps
from msif_core.scoring import _costs, score_documents


@pytest.mark.parametrize("arch", ARCHS)
def test_measurement_gradients_match_brute_force(arch):
    w = world(arch)
    grads = measurement_gradients(w.ft, w.specs, w.queries, batch_size=2, pad_id=PAD)
    want = w.stack(w.grad_m)
    for n in w.names:
        assert rel_err(grads[n], want[n]) < 1e-9, n
    # batch size and padding change nothing
    again = measurement_gradients(w.ft, w.specs, w.queries, batch_size=1, pad_id=5)
    for n in w.names:
        assert rel_err(again[n], grads[n]) < 1e-10
    sub = grads.select([2, 0])
    assert sub.n_queries == 2 and all(torch.equal(sub[n], grads[n][[2, 0]]) for n in w.names)


def test_long_queries_keep_dense_gradients_where_tokens_would_take_more_memory():
    """Mixed lengths: modules whose padded tokens outgrow P·d keep dense ∇m, the rest tokens; both exact."""
    w = world("gpt_neox")
    queries = random_pairs(3, (2, 3), (1, 2), seed=41)
    extra = 10 - len(queries.input_ids[1])  # one query of 10 tokens: P·d / (P + d) is 8.2 to 12.6 here
    queries.input_ids[1] = queries.input_ids[1] + [5 + i for i in range(extra)]
    queries.loss_mask[1] = queries.loss_mask[1] + [True] * extra
    grads = measurement_gradients(w.ft, w.specs, queries, batch_size=2, pad_id=PAD)
    t_max = max(len(x) for x in queries.input_ids)
    for s in w.specs:
        assert (grads.tokens(s.name) is None) == (t_max * (s.out_features + s.d) >= s.out_features * s.d)
        assert s.name in grads
    assert {grads.tokens(s.name) is None for s in w.specs} == {True, False}  # both kinds in this model
    want = w.stack([sequence_grads(w.ft, w.specs, fn) for fn in loss_closures(w.ft, queries)])
    for n in w.names:
        assert rel_err(grads[n], want[n]) < 1e-9, n
        assert torch.equal(grads.select(1)[n], grads[n][[1]])
    ih = query_ihvps(grads, w.specs, "ms_if", ft_factors=w.ft_f, pt_factors=w.pt_f, damping_ft=DAMP_FT,
                     damping_pt=DAMP_PT)
    for s in w.specs:
        want_ih = explicit_precondition(w.pt_f, s.name, explicit_precondition(w.ft_f, s.name, want[s.name], DAMP_FT),
                                        DAMP_PT)
        assert rel_err(ih.matrix(s.name), want_ih) < 1e-9, s.name


@pytest.mark.parametrize("method", ["ms_if", "ss_if"])
def test_query_ihvps_from_tokens_equal_those_from_dense_gradients(method):
    """Preconditioning from the measurement gradients' tokens = preconditioning their dense matrices."""
    w = world("llama")
    grads = measurement_gradients(w.ft, w.specs, w.queries, batch_size=2, pad_id=PAD)
    args = dict(ft_factors=w.ft_f, pt_factors=w.pt_f, damping_ft=DAMP_FT, damping_pt=DAMP_PT)
    from_tokens = query_ihvps(grads, w.specs, method, **args)
    from_dense = query_ihvps({n: grads[n] for n in grads}, w.specs, method, **args)
    for n in w.names:
        assert rel_err(from_tokens.matrix(n), from_dense.matrix(n)) < 1e-10, n


@pytest.mark.parametrize("strategy", ["gradient", "low_rank"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ss_if_equals_explicit_computation(arch, strategy):
    """SS-IF = ⟨P_ft ∇m, ∇ℓ(z; θ_ft)⟩ with candidate gradients materialised by autograd."""
    w = world(arch)
    gm = w.stack(w.grad_m)
    p_m = {n: explicit_precondition(w.ft_f, n, gm[n], DAMP_FT) for n in w.names}
    want = w.explicit(p_m, w.stack(w.grad_ft))
    grads = measurement_gradients(w.ft, w.specs, w.queries, batch_size=2, pad_id=PAD)
    rank = FULL_RANK if strategy == "low_rank" else 0
    ih = query_ihvps(grads, w.specs, "ss_if", ft_factors=w.ft_f, damping_ft=DAMP_FT, rank=rank)
    res = score_documents(w.ft, ih, w.docs, batch_size=w.bs, pad_id=PAD, strategy=strategy)
    assert res.scores.shape == (len(w.docs), len(w.queries))
    assert rel_err(res.scores, want) < 1e-8
    assert rel_err(res.losses, [lm_loss(w.ft, d, m).item() for d, m in zip(w.docs.input_ids, w.docs.loss_mask)]) < 1e-10


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_ms_if_equals_the_papers_double_preconditioning(arch):
    """MS-IF = ⟨P_ft ∇m(θ_ft), P_pt ∇ℓ(z; θ_pt)⟩ (paper eq. 12): the candidate side preconditioned explicitly."""
    w = world(arch)
    gm = w.stack(w.grad_m)
    gz = w.stack(w.grad_pt)
    p_m = {n: explicit_precondition(w.ft_f, n, gm[n], DAMP_FT) for n in w.names}
    p_z = {n: explicit_precondition(w.pt_f, n, gz[n], DAMP_PT) for n in w.names}
    want = w.explicit(p_m, p_z)
    grads = measurement_gradients(w.ft, w.specs, w.queries, batch_size=2, pad_id=PAD)
    for rank, strategy in ((0, "gradient"), (FULL_RANK, "low_rank"), (FULL_RANK, "gradient")):
        ih = query_ihvps(grads, w.specs, "ms_if", ft_factors=w.ft_f, pt_factors=w.pt_f, damping_ft=DAMP_FT,
                         damping_pt=DAMP_PT, rank=rank)
        res = score_documents(w.pt, ih, w.docs, batch_size=3, pad_id=PAD, strategy=strategy)
        assert rel_err(res.scores, want) < 1e-8, (rank, strategy)
    # the test can tell the published errors apart: no P_pt, or the candidate scored on θ_ft
    assert rel_err(w.explicit(p_m, gz), want) > 0.05
    assert rel_err(w.explicit(p_m, {n: explicit_precondition(w.pt_f, n, w.stack(w.grad_ft)[n], DAMP_PT)
                                     for n in w.names}), want) > 0.01
    # swapping the two stages' damping is visible too
    ih = query_ihvps(grads, w.specs, "ms_if", ft_factors=w.ft_f, pt_factors=w.pt_f, damping_ft=DAMP_PT,
                     damping_pt=DAMP_FT)
    assert rel_err(score_documents(w.pt, ih, w.docs, batch_size=3, pad_id=PAD).scores, want) > 0.01


def test_gdp_is_the_raw_gradient_dot_product():
    w = world("gpt2")
    want = w.explicit(w.stack(w.grad_m), w.stack(w.grad_pt))
    grads = measurement_gradients(w.ft, w.specs, w.queries, pad_id=PAD)
    res = score_documents(w.pt, query_ihvps(grads, w.specs, "gdp"), w.docs, batch_size=2, pad_id=PAD)
    assert rel_err(res.scores, want) < 1e-9


def test_rank_r_query_ihvps():
    w = world("gpt_neox")
    grads = measurement_gradients(w.ft, w.specs, w.queries, pad_id=PAD)
    dense = query_ihvps(grads, w.specs, "ss_if", ft_factors=w.ft_f, damping_ft=DAMP_FT)
    full = query_ihvps(grads, w.specs, "ss_if", ft_factors=w.ft_f, damping_ft=DAMP_FT, rank=FULL_RANK,
                       rank_scope="block")
    r2 = query_ihvps(grads, w.specs, "ss_if", ft_factors=w.ft_f, damping_ft=DAMP_FT, rank=2, rank_scope="block")
    for s in w.specs:
        assert rel_err(full.matrix(s.name), dense.matrix(s.name)) < 1e-10
        m2 = r2.matrix(s.name).reshape(3, s.n_blocks, s.p, s.d)
        exact = dense.matrix(s.name).reshape(3, s.n_blocks, s.p, s.d)
        sv = torch.linalg.svdvals(exact)
        assert (torch.linalg.matrix_rank(m2) <= 2).all()
        # the scoring layout [blocks, Q, p·d], expanded from U Vᵀ or copied from the dense iHVPs
        for ih, m in ((r2, m2), (dense, exact)):
            torch.testing.assert_close(ih.block_rows(s.name), m.reshape(3, s.n_blocks, -1).transpose(0, 1),
                                       rtol=1e-12, atol=1e-14)
        # Eckart–Young: the best rank-2 approximation leaves exactly the trailing singular values
        err = torch.linalg.matrix_norm(exact - m2)
        torch.testing.assert_close(err, sv[..., 2:].norm(dim=-1), rtol=1e-8, atol=1e-12)
    exact_scores = score_documents(w.ft, dense, w.docs, batch_size=3, pad_id=PAD).scores
    full_scores = score_documents(w.ft, full, w.docs, batch_size=3, pad_id=PAD, strategy="low_rank").scores
    assert rel_err(full_scores, exact_scores) < 1e-9
    low = score_documents(w.ft, r2, w.docs, batch_size=3, pad_id=PAD, strategy="low_rank").scores
    via_grad = score_documents(w.ft, r2, w.docs, batch_size=3, pad_id=PAD, strategy="gradient").scores
    want = w.explicit({n: r2.matrix(n) for n in w.names}, w.stack(w.grad_ft))
    assert rel_err(low, want) < 1e-9 and rel_err(via_grad, want) < 1e-9
    assert rel_err(low, exact_scores) > 1e-4  # rank 2 is an approximation here


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_module_rank_r_query_ihvps(arch: str):
    """Rank r of each module's whole [P, d] iHVP (one V shared by its blocks): the best rank-r matrix of
    the exact per-block preconditioning, stored in (P + d)·r numbers, and every contraction scores it
    exactly, block by block."""
    w = world(arch)
    grads = measurement_gradients(w.ft, w.specs, w.queries, pad_id=PAD)
    dense = query_ihvps(grads, w.specs, "ms_if", ft_factors=w.ft_f, pt_factors=w.pt_f, damping_ft=DAMP_FT,
                        damping_pt=DAMP_PT)
    r2 = query_ihvps(grads, w.specs, "ms_if", ft_factors=w.ft_f, pt_factors=w.pt_f, damping_ft=DAMP_FT,
                     damping_pt=DAMP_PT, rank=2)
    assert r2.manifest["rank_scope"] == "module"
    for s in w.specs:
        u, v = r2.u[s.name], r2.v[s.name]
        assert u.shape == (3, s.n_blocks, s.p, 2) and v.shape == (3, 1, s.d, 2)  # (P + d)·r numbers
        exact, m2 = dense.matrix(s.name), r2.matrix(s.name)
        assert (torch.linalg.matrix_rank(m2) <= 2).all()
        sv = torch.linalg.svdvals(exact)  # of the whole module matrix, not per block
        torch.testing.assert_close(torch.linalg.matrix_norm(exact - m2), sv[..., 2:].norm(dim=-1), rtol=1e-8,
                                   atol=1e-12)
        torch.testing.assert_close(r2.block_rows(s.name), m2.reshape(3, s.n_blocks, -1).transpose(0, 1),
                                   rtol=1e-12, atol=1e-14)
    docs_g = {s.name: torch.stack([g[s.name] for g in w.grad_pt]).double() for s in w.specs}  # [N, P, d]
    want_blocks = np.stack([torch.einsum("npd,qpd->nq", docs_g[s.name][:, b.row_start:b.row_stop],
                                         r2.matrix(s.name)[:, b.row_start:b.row_stop].double()).numpy()
                            for s in w.specs for b in s.blocks], axis=1)  # [N, blocks, Q], explicit
    for strategy in ("low_rank", "gradient", "auto"):
        res = score_documents(w.pt, r2, w.docs, batch_size=3, pad_id=PAD, strategy=strategy)
        assert rel_err(res.by_block, want_blocks) < 1e-9, strategy


def test_randomized_module_rank_is_near_optimal_and_seeded():
    """Large modules take the randomized range finder: seeded (same factors twice), and within 1% of the
    best rank-r error on a matrix with a decaying spectrum."""
    from msif_core.models import Block, ModuleSpec
    from msif_core.query import low_rank_module

    g = torch.Generator().manual_seed(5)
    big_p, d, r = 240, 96, 6
    left = torch.linalg.qr(torch.randn(2, big_p, d, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(2, d, d, generator=g, dtype=torch.float64)).Q
    spectrum = 0.7 ** torch.arange(d, dtype=torch.float64)
    m = left @ torch.diag_embed(spectrum.expand(2, d)) @ right.transpose(1, 2)
    spec = ModuleSpec("x", "mlp", "linear", d - 1, big_p, True, (Block("x", "x", "mlp", "out", None, 0, big_p),))
    assert min(big_p, d) > 2 * (r + 10)  # the randomized path
    u, v = low_rank_module(m, spec, r)
    u2, v2 = low_rank_module(m, spec, r)
    assert torch.equal(u, u2) and torch.equal(v, v2)
    approx = (u.reshape(2, big_p, r) @ v[:, 0].transpose(1, 2))
    best = spectrum[r:].norm()
    err = torch.linalg.matrix_norm(m - approx)
    assert (err <= 1.01 * best).all(), (err, best)


def test_batch_size_and_padding_do_not_change_scores():
    w = world("bloom")
    grads = measurement_gradients(w.ft, w.specs, w.queries, pad_id=PAD)
    ih = query_ihvps(grads, w.specs, "ms_if", ft_factors=w.ft_f, pt_factors=w.pt_f, damping_ft=DAMP_FT,
                     damping_pt=DAMP_PT, rank=3)
    ref = score_documents(w.pt, ih, w.docs, batch_size=1, pad_id=PAD)
    for bs, pad, strategy in ((3, PAD, "gradient"), (7, 11, "low_rank"), (2, 30, "auto")):
        res = score_documents(w.pt, ih, w.docs, batch_size=bs, pad_id=pad, strategy=strategy)
        assert rel_err(res.by_block, ref.by_block) < tol_for("bloom")
        np.testing.assert_allclose(res.losses, ref.losses, rtol=tol_for("bloom", 1e-12))


def test_auto_contraction_mixing_strategies_across_grouped_batches():
    """With ``auto``, a module takes the low-rank contraction for short batches and the gradient one for
    long batches; the gradients of several batches are scored together in groups (of one sequence, or
    of all): every combination gives the explicitly computed scores."""
    w = world("gpt_neox")
    grads = measurement_gradients(w.ft, w.specs, w.queries, pad_id=PAD)
    ih = query_ihvps(grads, w.specs, "ss_if", ft_factors=w.ft_f, damping_ft=DAMP_FT, rank=4, rank_scope="block")
    docs = random_docs(8, 2, 6, seed=34)
    lengths = sorted({len(x) for x in docs.input_ids})
    chosen = {(s.name, t): _costs(s, t, 3, 4, group_rows=8)[1] < _costs(s, t, 3, 4, group_rows=8)[0]
              for s in w.specs for t in lengths}  # as with one group of all 8 documents (group_mib=1024)
    assert any(chosen.values()) and not all(chosen.values()), "the data must mix both contractions"
    assert any(len({chosen[s.name, t] for t in lengths}) == 2 for s in w.specs), "…within one module"
    want = w.explicit({n: ih.matrix(n) for n in w.names},
                      w.stack([sequence_grads(w.ft, w.specs, fn) for fn in loss_closures(w.ft, docs)]))
    two_and_a_half = 2.5 * sum(s.out_features * s.d for s in w.specs) * 8 / 2**20  # MiB of 2.5 sequences
    for group_mib, batch_size in ((0, 1), (1024, 1), (two_and_a_half, 1), (two_and_a_half, 3)):
        res = score_documents(w.ft, ih, docs, batch_size=batch_size, pad_id=PAD, group_mib=group_mib)
        assert rel_err(res.scores, want) < 1e-9, (group_mib, batch_size)


def test_per_block_scores_are_labelled_and_add_up():
    w = world("llama")
    grads = measurement_gradients(w.ft, w.specs, w.queries, pad_id=PAD)
    ih = query_ihvps(grads, w.specs, "ss_if", ft_factors=w.ft_f, damping_ft=DAMP_FT)
    res = score_documents(w.ft, ih, w.docs, batch_size=4, pad_id=PAD)
    blocks = discover_blocks(w.ft)
    assert res.block_names == [b.name for b in blocks]
    assert res.block_kinds == [b.kind for b in blocks]
    gz = w.stack(w.grad_ft)
    specs = {s.name: s for s in w.specs}
    for k, b in enumerate(blocks):
        rows = slice(b.row_start, b.row_stop)
        want = torch.einsum("npd,qpd->nq", gz[b.module_name][:, rows], ih.matrix(b.module_name)[:, rows])
        assert rel_err(res.by_block[:, k], want) < 1e-8, b.name
        assert specs[b.module_name].blocks[[x.name for x in specs[b.module_name].blocks].index(b.name)] == b
    np.testing.assert_allclose(res.by_block.sum(axis=1), res.scores, rtol=1e-12)
    np.testing.assert_allclose(res.part("mlp") + res.part("mha"), res.scores, rtol=1e-10, atol=1e-14)
    assert np.abs(res.part("mlp")).sum() > 0 and np.abs(res.part("mha")).sum() > 0


def test_save_load_round_trips(tmp_path):
    w = world("gpt_neox")
    path = w.pt_f.save(tmp_path / "factors")
    fp = fingerprint(w.pt, w.specs)
    back = Factors.load(path, expect_fingerprint=fp)
    assert back.manifest["fingerprint"] == fp and back.specs == w.pt_f.specs
    # the manifest says what the factors are: model, blocks and layout, counts, settings, versions
    import json

    import transformers
    man = json.loads((path / "manifest.json").read_text())
    assert man["format"] == "msif-ekfac-1" and man["model_class"] == type(w.pt).__name__
    assert [m["name"] for m in man["modules"]] == w.names
    assert man["modules"][0]["layout"] == w.specs[0].layout and len(man["modules"][0]["blocks"]) == w.specs[0].n_blocks
    assert (man["tokens"], man["sequences"]) == (w.docs.n_tokens, len(w.docs))
    assert man["settings"]["fisher"] == "true" and man["settings"]["batch_size"] == 3
    assert man["versions"] == {"torch": torch.__version__, "transformers": transformers.__version__}
    for n in w.names:
        for a, b in ((back.q_a, w.pt_f.q_a), (back.q_s, w.pt_f.q_s), (back.lam, w.pt_f.lam)):
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    w.pt_f.save(tmp_path / "factors")  # overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors"]
    grads = measurement_gradients(w.ft, w.specs, w.queries, pad_id=PAD)
    for rank in (0, 2):
        ih = query_ihvps(grads, w.specs, "ms_if", ft_factors=w.ft_f, pt_factors=back, damping_ft=DAMP_FT,
                         damping_pt=DAMP_PT, rank=rank)
        ih2 = QueryIHVPs.load(ih.save(tmp_path / f"ihvp{rank}"))
        assert (ih2.method, ih2.rank, ih2.n_queries, ih2.specs) == ("ms_if", rank, 3, ih.specs)
        assert ih2.manifest["damping_pt"] == DAMP_PT and ih2.manifest["damping_ft"] == DAMP_FT
        for n in ih.specs:
            torch.testing.assert_close(ih2.matrix(n), ih.matrix(n), rtol=0, atol=0)  # stored bit for bit
        a = score_documents(w.pt, ih, w.docs, batch_size=3, pad_id=PAD).scores
        b = score_documents(w.pt, ih2, w.docs, batch_size=3, pad_id=PAD).scores
        np.testing.assert_allclose(a, b, rtol=1e-12)  # not bit for bit: MKL's sums can vary run to run


def test_finetune_with_a_replaced_classification_head(tmp_path):
    """θ_ft = the pre-trained backbone (perturbed) under a new 3-way classifier head: MS-IF runs over the
    shared backbone blocks and equals the explicit computation with m = −log p(label | x)."""
    from transformers import GPTNeoXForSequenceClassification

    pt = tiny_model("gpt_neox", seed=8)
    cfg = copy.deepcopy(pt.config)
    cfg.num_labels = 3
    cfg.pad_token_id = 2  # as fine-tunes often do (eos as pad), while the tokenizer's own pad id is 0
    cls = GPTNeoXForSequenceClassification(cfg)
    cls.gpt_neox.load_state_dict(perturbed_copy(pt, 0.05).gpt_neox.state_dict())
    cls = cls.double().eval()
    pt.save_pretrained(tmp_path / "pt")
    cls.save_pretrained(tmp_path / "ft")
    _word_tokenizer().save_pretrained(tmp_path / "ft")

    settings = AttributionSettings(fisher="empirical", batch_size=3, damping_finetune=1e-3,
                                   damping_pretrain="relative:0.1")
    pt_stage, ft_stage = load_stages(tmp_path / "pt", tmp_path / "ft", settings, dtype=torch.float64)
    assert ft_stage.loaded.task == "sequence_classification" and pt_stage.loaded.task == "causal_lm"
    assert ft_stage.loaded.tokenizer.pad_token_id == 0 and ft_stage.pad_id == 2  # the head finds rows' ends by 2
    assert pt_stage.loaded.tokenizer is None  # saved without one: no invented tokenizer
    names = [s.name for s in ft_stage.specs]
    assert names == [s.name for s in pt_stage.specs] == [s.name for s in discover_modules(pt)]
    assert all(n.startswith("gpt_neox.layers.") for n in names)

    docs = random_docs(6, 3, 8, seed=41)
    ftdata = with_labels(random_pairs(6, (2, 4), (1, 3), seed=42), 3, seed=43)
    queries = with_labels(random_pairs(3, (2, 4), (1, 3), seed=44), 3, seed=45)
    ft_f = fit_stage_factors(ft_stage, ftdata, settings)
    pt_f = fit_stage_factors(pt_stage, docs, settings)
    grads = measurement_gradients(ft_stage.model, ft_stage.specs, queries, 2, ft_stage.pad_id)
    res = score_method("ms_if", pt_stage, ft_stage, grads, docs, settings, pt_f, ft_f)

    ft_model, pt_model = ft_stage.model, pt_stage.model
    specs = ft_stage.specs
    gm = [sequence_grads(ft_model, specs, fn) for fn in loss_closures(ft_model, queries)]
    gz = [sequence_grads(pt_model, specs, fn) for fn in loss_closures(pt_model, docs)]
    for q in range(3):
        for n in names:
            assert rel_err(grads[n][q], gm[q][n]) < 1e-9
    want = np.zeros((len(docs), 3))
    for n in names:
        pm = explicit_precondition(ft_f, n, torch.stack([g[n] for g in gm]), 1e-3)
        pz = explicit_precondition(pt_f, n, torch.stack([g[n] for g in gz]), "relative:0.1")
        want += torch.einsum("npd,qpd->nq", pz, pm).numpy()
    assert rel_err(res.scores, want) < 1e-8
    # the classifier fine-tune's factors are those of its label loss (m), fitted on its own examples
    bf_lam = sum(float((g[names[-1]] ** 2).sum()) for g in
                 (sequence_grads(ft_model, specs, fn) for fn in loss_closures(ft_model, ftdata))) / len(ftdata)
    assert abs(float(ft_f.lam[names[-1]].sum()) - bf_lam) < 1e-9 * bf_lam
    with pytest.raises(ValueError, match="classification head"):
        score_method("ss_if", pt_stage, ft_stage, grads, docs, settings, pt_f, ft_f)


# ----------------------------------------------------------------------------------- one-call API

def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2} | {f"w{i}": i for i in range(FIRST_TOKEN, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def _text(ids):
    return " ".join(f"w{i}" for i in ids)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_attribute_end_to_end(tmp_path, device):
    """The public one-call API on two saved checkpoints equals the explicit computations (float32), also
    with the models on a GPU (the reference stays on the CPU)."""
    pt = tiny_model("gpt_neox", seed=9)
    ft = perturbed_copy(pt, 0.05)
    tok = _word_tokenizer()
    for m, d in ((pt, "pt"), (ft, "ft")):
        m.float().save_pretrained(tmp_path / d)
        tok.save_pretrained(tmp_path / d)
        m.double()
    docs = random_docs(6, 3, 8, seed=51)
    pairs = random_pairs(5, (2, 3), (1, 3), seed=52)
    queries = random_pairs(2, (2, 3), (2, 3), seed=53)
    split = [m.index(True) for m in queries.loss_mask]
    documents = [(f"d{i}", _text(x)) for i, x in enumerate(docs.input_ids)]
    finetuning = [(_text(x[:m.index(True)]), " " + _text(x[m.index(True):]))
                  for x, m in zip(pairs.input_ids, pairs.loss_mask)]
    qs = [(f"q{i}", _text(x[:k]), " " + _text(x[k:])) for i, (x, k) in enumerate(zip(queries.input_ids, split))]
    settings = AttributionSettings(fisher="true", batch_size=3, damping_finetune=1e-1, damping_pretrain=1e-2,
                                   max_length=16, seed=3)
    table = attribute(tmp_path / "pt", tmp_path / "ft", documents, finetuning, qs, settings, device=device)

    assert set(table.method) == {"ms_if", "ss_if", "gdp"} and len(table) == 3 * 6 * 2
    # the tokenizer reproduces our ids, so the brute force below sees the same data
    enc_docs = encode_documents(tok, [t for _, t in documents], 16)
    enc_pairs = encode_pairs(tok, [p for p, _ in finetuning], [c for _, c in finetuning], 16)
    assert enc_docs.input_ids == docs.input_ids and enc_pairs.input_ids == pairs.input_ids
    assert enc_pairs.loss_mask == pairs.loss_mask
    pt32, ft32 = pt.float(), ft.float()
    specs = discover_modules(pt32)
    fs = settings.fit_settings()
    pt_f = fit_ekfac(pt32, specs, docs, fs, PAD)
    ft_f = fit_ekfac(ft32, specs, pairs, fs, PAD)
    pt64, ft64 = pt32.double(), ft32.double()
    names = [s.name for s in specs]
    gm = [sequence_grads(ft64, specs, fn) for fn in loss_closures(ft64, queries)]
    gz_pt = [sequence_grads(pt64, specs, fn) for fn in loss_closures(pt64, docs)]
    gz_ft = [sequence_grads(ft64, specs, fn) for fn in loss_closures(ft64, docs)]
    stack = lambda gs, n: torch.stack([g[n] for g in gs])  # noqa: E731
    want = {"gdp": 0, "ss_if": 0, "ms_if": 0}
    for n in names:
        pm = explicit_precondition(ft_f, n, stack(gm, n), 1e-1)
        want["gdp"] = want["gdp"] + torch.einsum("npd,qpd->nq", stack(gz_pt, n), stack(gm, n)).numpy()
        want["ss_if"] = want["ss_if"] + torch.einsum("npd,qpd->nq", stack(gz_ft, n), pm).numpy()
        pz = explicit_precondition(pt_f, n, stack(gz_pt, n), 1e-2)
        want["ms_if"] = want["ms_if"] + torch.einsum("npd,qpd->nq", pz, pm).numpy()
    # each empty input is named, with the fix
    for args, what in (((documents, finetuning, []), "queries is empty"),
                       ((documents, [], qs), "finetuning is empty.*methods=\\('gdp',\\)"),
                       (([], finetuning, qs), "documents is empty"),
                       (([("d0", "w5")], finetuning, qs), "documents: none of the 1 has the 2 tokens"),
                       ((documents, finetuning, [("q0", "w5", "")]), "queries: none of the 1 has a completion"),
                       ((documents, [("w5", "")], qs), "finetuning: none of the 1 pairs")):
        with pytest.raises(ValueError, match=what):
            attribute(tmp_path / "pt", tmp_path / "ft", *args, settings, device=device)
    gdp_only = AttributionSettings(batch_size=3, max_length=16, methods=("gdp",))
    assert set(attribute(tmp_path / "pt", tmp_path / "ft", documents, [], qs, gdp_only, device=device).method) == {
        "gdp"}
    # the text and representation baselines through the same call (msif_core.methods.score)
    baselines = attribute(tmp_path / "pt", tmp_path / "ft", documents, [], qs,
                          AttributionSettings(batch_size=3, max_length=16, methods=("bm25", "repsim")), device=device)
    enc_q = encode_pairs(tok, [p for _, p, _ in qs], [c for _, _, c in qs], 16)
    want_text = {"bm25": bm25_scores([t for _, t in documents], [p + c for _, p, c in qs]),
                 "repsim": repsim_scores(ft, pt, tok, enc_docs, enc_q, batch_size=3)}
    for method, w in want_text.items():
        got = baselines[baselines.method == method].pivot(index="doc_id", columns="query_id", values="score")
        np.testing.assert_allclose(got.loc[[d for d, _ in documents], [q for q, _, _ in qs]].to_numpy(), w,
                                   rtol=1e-5, atol=1e-6, err_msg=method)  # float32 models in attribute()
        assert baselines[baselines.method == method].mlp_score.isna().all()
    with pytest.raises(ValueError, match="unknown method 'ms-if'"):
        attribute(tmp_path / "pt", tmp_path / "ft", documents, finetuning, qs,
                  AttributionSettings(methods=("ms-if",)), device=device)
    for method, w in want.items():
        t = table[table.method == method]
        got = t.pivot(index="doc_id", columns="query_id", values="score").loc[[d for d, _ in documents],
                                                                              [q for q, _, _ in qs]]
        assert rel_err(got.to_numpy(), w) < 1e-4, method
        np.testing.assert_allclose(t.mlp_score + t.mha_score, t.score, rtol=1e-5, atol=1e-9)
        for _, g in t.groupby("query_id"):
            assert list(g.sort_values("rank").score) == sorted(g.score, reverse=True)
