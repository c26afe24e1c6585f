"""Fitted EK-FAC factors (A, S, their eigenbases, Λ) equal brute-force per-sequence autograd values.

For each of GPT-NeoX, BLOOM, GPT-2 (Conv1D) and Llama (grouped-query), all with bias columns, on
right-padded batches of documents and of prompt-masked (prompt, completion) pairs; empirical Fisher
exactly, true Fisher by replaying the seeded draws; plus the loss alignment of sampled targets, batch
size / padding invariance, the example cap, seeding and shard merging.
"""

from __future__ import annotations

import pytest
import torch
from helpers.core import (
    ARCHS,
    BIASLESS,
    PAD,
    BruteRun,
    assert_eigenbasis,
    assert_scaled_close,
    batch_for,
    loss_closures,
    one_thread,  # noqa: F401  (autouse fixture)
    random_docs,
    random_pairs,
    sampled_labels,
    sampled_targets,
    tiny_model,
    tol_for,
    with_labels,
)

from msif_core.data import Encoded, collate
from msif_core.ekfac import (
    FitSettings,
    PassCache,
    _add_gram_upper,
    _mirror_lower,
    _per_sequence_branch,
    covariance_sums,
    eigenbasis,
    fit_ekfac,
    lambda_sums,
    merge_all,
)
from msif_core.gradients import token_losses
from msif_core.models import discover_modules

DOCS = random_docs(7, 3, 9, seed=11)  # lengths vary: batches of 3 are right-padded
PAIRS = random_pairs(6, (2, 4), (1, 4), seed=12)  # loss on completion tokens only
DATA = {"docs": DOCS, "pairs": PAIRS}
BATCH = 3


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, seed=1) for arch in ARCHS}


def _check_factors(model, specs, enc, settings, bf_cov: BruteRun, bf_lam: BruteRun, tol: float = 1e-9):
    sums = covariance_sums(model, specs, enc, settings, PAD)
    assert sums.tokens == bf_cov.tokens == enc.n_tokens  # padding never counted
    assert sums.sequences == len(enc)
    for s in specs:
        assert_scaled_close(sums.a[s.name], bf_cov.a_sum[s.name], f"A sum of {s.name}", tol)
        assert_scaled_close(sums.s[s.name], bf_cov.s_sum[s.name], f"S sums of {s.name}", tol)
    f = fit_ekfac(model, specs, enc, settings, PAD)
    assert f.manifest["tokens"] == enc.n_tokens and f.manifest["sequences"] == len(enc)
    for s in specs:
        assert_eigenbasis(f.q_a[s.name], bf_cov.a_sum[s.name] / bf_cov.tokens, f"Q_A of {s.name}", max(tol, 1e-10))
        for j, b in enumerate(s.blocks):
            assert_eigenbasis(f.q_s[s.name][j], bf_cov.s_sum[s.name][j] / bf_cov.tokens, f"Q_S of {b.name}",
                              max(tol, 1e-10))
    lam = bf_lam.lam(f.q_a, f.q_s)
    for s in specs:
        assert_scaled_close(f.lam[s.name], lam[s.name], f"Λ of {s.name}", tol)
    return f


@pytest.mark.parametrize("kind", ["docs", "pairs"])
@pytest.mark.parametrize("arch", ARCHS)
def test_empirical_fisher_factors_match_brute_force(models, arch, kind):
    model, enc = models[arch], DATA[kind]
    specs = discover_modules(model)
    assert any(s.has_bias for s in specs) != (arch in BIASLESS), "the tiny models must exercise the bias column"
    assert any(s.n_blocks > 1 for s in specs), "attention q/k/v must be split per head"
    bf = BruteRun(model, specs, loss_closures(model, enc))
    _check_factors(model, specs, enc, FitSettings(fisher="empirical", batch_size=batch_for(arch, BATCH)), bf, bf,
                   tol_for(arch))


def test_user_tagged_modules_match_brute_force(models):
    """Any model through module_tags: each tagged module is one block (here GPT-2's transposed Conv1D
    projections, tagged by hand), fitted like the discovered ones."""
    model = models["gpt2"]
    tags = {"transformer.h.0.attn.c_attn": "mha", "transformer.h.0.mlp.c_fc": "mlp",
            "transformer.h.1.mlp.c_proj": "mlp"}
    specs = discover_modules(model, module_tags=tags)
    assert [(s.name, s.kind, s.n_blocks, s.layout) for s in specs] == [
        (n, k, 1, "conv1d") for n, k in tags.items()]
    assert [s.kind for s in discover_modules(model, modules="mlp", module_tags=tags)] == ["mlp", "mlp"]
    bf = BruteRun(model, specs, loss_closures(model, PAIRS))
    _check_factors(model, specs, PAIRS, FitSettings(fisher="empirical", batch_size=BATCH), bf, bf)


def test_factors_without_bias_columns_match_brute_force():
    """Llama as usually configured (no biases): d is the input width, no constant column."""
    model = tiny_model("llama", seed=1, attention_bias=False, mlp_bias=False)
    specs = discover_modules(model)
    assert not any(s.has_bias for s in specs) and all(s.d == s.in_features for s in specs)
    bf = BruteRun(model, specs, loss_closures(model, PAIRS))
    _check_factors(model, specs, PAIRS, FitSettings(fisher="empirical", batch_size=BATCH), bf, bf)


@pytest.mark.parametrize("kind", ["docs", "pairs"])
@pytest.mark.parametrize("arch", ARCHS)
def test_true_fisher_factors_match_brute_force(models, arch, kind):
    """Replays the seeded draws (y_t ~ softmax(logits at t−1) as target t) in an unpadded brute force;
    both passes use the same draws."""
    model, enc = models[arch], DATA[kind]
    specs = discover_modules(model)
    settings = FitSettings(fisher="true", batch_size=batch_for(arch, BATCH), seed=5)
    targets = sampled_targets(model, enc, settings.batch_size, settings.generator())
    n_resampled = sum(t != x for i in range(len(enc)) for t, x in zip(targets[i], enc.input_ids[i]))
    assert n_resampled > 0
    bf = BruteRun(model, specs, loss_closures(model, enc, targets))
    f = _check_factors(model, specs, enc, settings, bf, bf, tol_for(arch))
    emp = BruteRun(model, specs, loss_closures(model, enc)).lam(f.q_a, f.q_s)
    name = specs[-1].name
    assert not torch.allclose(f.lam[name], emp[name], rtol=1e-3), "true Fisher must not equal the empirical one"


def test_true_fisher_for_a_classification_head_matches_brute_force():
    """With a classifier head, the targets are labels drawn from the model's own softmax."""
    model = tiny_model("gpt_neox", seed=1, classification=True)
    specs = discover_modules(model)
    enc = with_labels(PAIRS, 3, seed=13)
    settings = FitSettings(fisher="true", batch_size=BATCH, seed=2)
    drawn = sampled_labels(model, enc, BATCH, settings.generator())
    assert drawn != enc.labels
    bf = BruteRun(model, specs, loss_closures(model, Encoded(enc.input_ids, enc.loss_mask, labels=drawn)))
    _check_factors(model, specs, enc, settings, bf, bf)


def test_banded_gram_is_the_upper_triangle_of_the_full_product():
    """Wide covariances are summed band by band on and right of the diagonal blocks, then mirrored."""
    x = torch.randn(50, 301, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    acc = torch.full((301, 301), 7.0, dtype=torch.float64)
    _add_gram_upper(acc, x)
    full = x.t() @ x + 7.0
    torch.testing.assert_close(acc.triu(), full.triu(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_mirror_lower(acc), full, rtol=1e-12, atol=1e-12)


def test_wide_modules_match_brute_force():
    """Modules wider than 256 (banded covariance sums) against the brute force, empirical Fisher."""
    model = tiny_model("gpt_neox", seed=1, hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    specs = discover_modules(model)
    assert max(s.d for s in specs) > 256 and max(s.p for s in specs) > 256
    enc = random_docs(3, 3, 6, seed=15)
    bf = BruteRun(model, specs, loss_closures(model, enc))
    _check_factors(model, specs, enc, FitSettings(fisher="empirical", batch_size=2), bf, bf)


LONG_DOCS = random_docs(5, 32, 45, seed=14)  # long enough that Λ rotates per-sequence gradients


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_long_sequence_factors_match_brute_force(models, arch):
    """The Λ pass's per-sequence rotation (chosen for long sequences) against the brute force."""
    model = models[arch]
    specs = discover_modules(model)
    assert all(_per_sequence_branch(s, 32) for s in specs), "the documents must take the long-sequence branch"
    settings = FitSettings(fisher="true", batch_size=2, seed=3)
    bf = BruteRun(model, specs, loss_closures(model, LONG_DOCS, sampled_targets(model, LONG_DOCS, 2,
                                                                                 settings.generator())))
    _check_factors(model, specs, LONG_DOCS, settings, bf, bf, tol_for(arch))


@pytest.mark.parametrize("docs", [DOCS, LONG_DOCS], ids=["short", "long"])
def test_lambda_pass_is_the_same_cached_partly_cached_or_recomputed(models, docs):
    """Keeping the covariance pass's gradients for the Λ pass only saves work: with none, one batch
    (the rest recomputed, resuming the true-Fisher draws) or all of them kept, Λ is identical."""
    model = models["gpt_neox"]
    specs = discover_modules(model)
    settings = FitSettings(fisher="true", batch_size=2, seed=4)
    full = PassCache(2**30)
    sums = covariance_sums(model, specs, docs, settings, PAD, full)
    n_batches = -(-len(docs) // 2)
    assert len(full.batches) == n_batches
    first = sum(t.numel() * t.element_size() for ts in full.batches[0].values() for t in ts)
    basis = eigenbasis(sums, specs)
    lams = {"all": lambda_sums(model, specs, docs, basis, settings, PAD, full)}
    assert full.batches == [], "a spent cache must not be reused"
    for label, budget in (("one", first), ("none", 0)):
        cache = PassCache(budget)
        covariance_sums(model, specs, docs, settings, PAD, cache)
        assert len(cache.batches) == (1 if label == "one" else 0)
        lams[label] = lambda_sums(model, specs, docs, basis, settings, PAD, cache)
    lams["no cache"] = lambda_sums(model, specs, docs, basis, settings, PAD)
    # fit_ekfac records how much of the data its Λ pass took from memory
    one = fit_ekfac(model, specs, docs, FitSettings(fisher="true", batch_size=2, seed=4, cache_mib=first / 2**20),
                    PAD).manifest["pass_cache"]
    assert one == {"batches": 1, "mib": round(first / 2**20, 1), "of_batches": n_batches,
                   "budget_mib": round(first / 2**20, 1)}
    for label in ("one", "none", "no cache"):
        for s in specs:
            assert_scaled_close(lams[label].lam[s.name], lams["all"].lam[s.name], f"Λ of {s.name}, cache {label}",
                                tol=1e-12)


def test_pass_cache_budget_is_explicit_or_a_share_of_available_memory(monkeypatch, tmp_path):
    """cache_mib in MiB when given; by default a quarter of the device's available memory, capped at
    16 GiB, 1 GiB where unknown; a negative budget is refused."""
    import msif_core.ekfac as ek

    cpu = torch.device("cpu")
    assert ek.cache_budget(FitSettings(cache_mib=3), cpu) == 3 * 2**20
    assert ek.cache_budget(FitSettings(cache_mib=0), cpu) == 0
    with pytest.raises(ValueError, match="cache_mib must be >= 0"):
        ek.cache_budget(FitSettings(cache_mib=-1), cpu)
    import msif_core.memory as mem

    avail = mem.available_memory(cpu)
    assert avail is not None and avail > 2**20, "MemAvailable of this Linux machine should be readable"
    # a container's limit bounds what /proc/meminfo (the host's) says; v2 "max" and v1's huge number: none
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    usage.write_text(str(2**30) + "\n")
    monkeypatch.setattr(mem, "CGROUP_MEMORY_FILES", ((str(limit), str(usage)),))
    for text, headroom in (("3221225472\n", 2 * 2**30), ("max\n", None), (str(2**62), None)):
        limit.write_text(text)
        assert mem._cgroup_headroom() == headroom
    limit.write_text(str(avail // 2 + 2**30))
    assert abs(mem.available_memory(cpu) - avail // 2) < 2**28  # the headroom, not the host's figure
    monkeypatch.setattr(ek, "available_memory", lambda device: 8 * 2**30)
    assert ek.cache_budget(FitSettings(), cpu) == 2 * 2**30
    monkeypatch.setattr(ek, "available_memory", lambda device: 200 * 2**30)
    assert ek.cache_budget(FitSettings(), cpu) == 16 * 2**30
    monkeypatch.setattr(ek, "available_memory", lambda device: None)
    assert ek.cache_budget(FitSettings(), cpu) == 2**30


def _onehot_logits(batch, scale=40.0):
    """Logits that put (almost) all mass at position t on token c[b, t] = (3 + 7t + b) mod 37 (c_t ≠ c_t±1)."""
    b, t = batch.input_ids.shape
    c = (3 + 7 * torch.arange(t)[None, :] + torch.arange(b)[:, None]) % 37
    logits = torch.full((b, t, 37), -scale, dtype=torch.float64)
    logits.scatter_(2, c[..., None], scale)
    return logits


def test_sampled_targets_are_scored_by_the_logits_they_were_drawn_from():
    """SPEC 5: sampling at t and scoring at t−1 (off by one) must not happen.

    With logits that put all mass on one token c_t at each position, a correctly aligned true-Fisher
    loss is ~0; a one-position shift would cost ~2×40 nats per target.
    """
    enc = Encoded([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]],
                  [[False, False, True, True, True, True], [False, True, True, True]])
    batch = collate(enc, [0, 1], pad_id=PAD)
    logits = _onehot_logits(batch)
    loss = token_losses(logits, batch, "true", torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and (loss.abs() < 1e-12).all()
    # and the empirical loss scores logits t against token t+1 on target positions only
    emp = token_losses(logits, batch, "empirical")
    for r, row in enumerate(enc.input_ids):
        ref = sum(torch.nn.functional.cross_entropy(logits[r, t - 1][None], torch.tensor([row[t]]))
                  for t in range(1, len(row)) if enc.loss_mask[r][t])
        assert abs(float(emp[r]) - float(ref)) < 1e-9


def test_masked_positions_contribute_nothing():
    """Changing prompt or padding targets, or the logits whose next token is not a target, changes nothing."""
    enc = Encoded([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]],
                  [[False, False, False, True, True, True], [False, False, True, True]])
    batch = collate(enc, [0, 1], pad_id=PAD)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 37, generator=g, dtype=torch.float64)
    base_emp = token_losses(logits, batch, "empirical")
    base_true = token_losses(logits, batch, "true", torch.Generator().manual_seed(9))

    other = collate(enc, [0, 1], pad_id=PAD)
    other.input_ids[~other.loss_mask] = 33  # every non-target token (prompt and padding) replaced
    torch.testing.assert_close(token_losses(logits, other, "empirical"), base_emp, rtol=0, atol=0)

    moved = logits.clone()
    no_target_next = ~batch.loss_mask[:, 1:]  # logits at t whose next token t+1 is not a target
    moved[:, :-1][no_target_next] = torch.randn(int(no_target_next.sum()), 37, generator=g, dtype=torch.float64)
    moved[:, -1] = 0.0  # the last position predicts nothing
    torch.testing.assert_close(token_losses(moved, batch, "empirical"), base_emp, rtol=0, atol=0)
    torch.testing.assert_close(token_losses(moved, batch, "true", torch.Generator().manual_seed(9)),
                               base_true, rtol=0, atol=0)

    # sanity: a completion target does matter
    hit = collate(enc, [0, 1], pad_id=PAD)
    hit.input_ids[0, 4] = 33
    assert not torch.allclose(token_losses(logits, hit, "empirical"), base_emp)


def _precond_all(f, specs, seed=0, damping=1e-3):
    g = torch.Generator().manual_seed(seed)
    return {s.name: f.precondition(s.name, torch.randn(s.out_features, s.d, generator=g, dtype=torch.float64),
                                   damping) for s in specs}


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_batch_size_and_padding_do_not_change_factors(models, fisher):
    """Also with sampled targets: each sequence's draws do not depend on the batch it lands in."""
    model = models["gpt_neox"]
    specs = discover_modules(model)
    fits = [fit_ekfac(model, specs, PAIRS, FitSettings(fisher=fisher, batch_size=bs, seed=2), pad)
            for bs, pad in ((1, PAD), (4, PAD), (4, 7), (len(PAIRS), 30))]
    ref = _precond_all(fits[0], specs)
    sums = [covariance_sums(model, specs, PAIRS, FitSettings(fisher=fisher, batch_size=bs, seed=2), pad)
            for bs, pad in ((1, PAD), (4, 7))]
    for s in specs:
        assert_scaled_close(sums[1].a[s.name], sums[0].a[s.name], "A sums vs batch size")
        assert_scaled_close(sums[1].s[s.name], sums[0].s[s.name], "S sums vs batch size")
    for f in fits[1:]:
        assert f.manifest["tokens"] == fits[0].manifest["tokens"] == PAIRS.n_tokens
        got = _precond_all(f, specs)
        for s in specs:
            assert_scaled_close(got[s.name], ref[s.name], f"iHVP of {s.name} vs batch size/padding", tol=1e-7)
            # Λ's total is basis-free: mean squared norm of the per-sequence gradients
            assert_scaled_close(f.lam[s.name].sum(), fits[0].lam[s.name].sum(), "Σ Λ")


def test_both_passes_report_progress_with_token_rates(models, caplog):
    import logging
    import re

    model = models["gpt_neox"]
    with caplog.at_level(logging.INFO, logger="msif_core.ekfac"):
        fit_ekfac(model, discover_modules(model), DOCS, FitSettings(batch_size=2), PAD)
    n = len(DOCS)
    for what in ("covariance", "eigenvalue"):
        assert re.search(rf"EK-FAC {what} pass: {n}/{n} sequences, [0-9]+ tokens/s", caplog.text), what


def test_max_examples_caps_both_passes(models):
    model = models["llama"]
    specs = discover_modules(model)
    settings = FitSettings(fisher="true", batch_size=2, max_examples=4, seed=1)
    capped = fit_ekfac(model, specs, DOCS, settings, PAD)
    first = fit_ekfac(model, specs, DOCS.subset(range(4)), settings, PAD)
    assert capped.manifest["sequences"] == 4
    assert capped.manifest["tokens"] == sum(len(x) for x in DOCS.input_ids[:4])
    for s in specs:
        torch.testing.assert_close(capped.lam[s.name], first.lam[s.name], rtol=0, atol=0)


def test_true_fisher_is_seeded(models):
    model = models["gpt2"]
    specs = discover_modules(model)
    a, b, c = (fit_ekfac(model, specs, DOCS, FitSettings(fisher="true", batch_size=3, seed=seed), PAD)
               for seed in (0, 0, 1))
    name = specs[0].name
    torch.testing.assert_close(a.lam[name], b.lam[name], rtol=0, atol=0)
    assert not torch.allclose(a.lam[name], c.lam[name])


def test_shard_sums_merge_to_the_full_pass(models):
    model = models["bloom"]
    specs = discover_modules(model)
    settings = FitSettings(fisher="empirical", batch_size=2)
    full = covariance_sums(model, specs, DOCS, settings, PAD)
    parts = [covariance_sums(model, specs, DOCS.subset(ix), settings, PAD) for ix in ([0, 1, 2], [3, 4, 5, 6])]
    merged = merge_all(parts)
    assert (merged.tokens, merged.sequences) == (full.tokens, full.sequences)
    for s in specs:
        assert_scaled_close(merged.a[s.name], full.a[s.name], "merged A", tol_for("bloom"))
        assert_scaled_close(merged.s[s.name], full.s[s.name], "merged S", tol_for("bloom"))
    basis = eigenbasis(full)
    lam_full = lambda_sums(model, specs, DOCS, basis, settings, PAD)
    lam_merged = merge_all(lambda_sums(model, specs, DOCS.subset(ix), basis, settings, PAD)
                           for ix in ([0, 1, 2], [3, 4, 5, 6]))
    assert lam_merged.sequences == lam_full.sequences == len(DOCS)
    for s in specs:
        assert_scaled_close(lam_merged.lam[s.name], lam_full.lam[s.name], "merged Λ", tol_for("bloom"))
