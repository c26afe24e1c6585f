"""The GPU path against the CPU brute force; skipped where no CUDA GPU is present (CI has none).

Run on a GPU machine with ``bash bench/gpu_check.sh``. Factors fitted with the model on the GPU
(float64) equal the brute force (unpadded per-sequence autograd, the same model on the GPU), for every
architecture, empirical and true Fisher, the long-sequence Λ branch and the cache included; SS-IF and
MS-IF scored on the GPU equal the explicit computation with the same factors; float32 on the GPU agrees
to float32 accuracy. The true-Fisher draws come from a CPU generator, so CPU and GPU draw the same
targets: their factors agree to the models' own CPU/GPU difference (rotary and ALiBi tables are
computed in float32, ~1e-7 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.core import (
    ARCHS,
    PAD,
    BruteRun,
    assert_eigenbasis,
    assert_scaled_close,
    explicit_precondition,
    loss_closures,
    random_docs,
    random_pairs,
    rel_err,
    sampled_targets,
    sequence_grads,
    tiny_model,
)
from helpers.scoring import DAMP_FT, DAMP_PT, FULL_RANK, world

from msif_core.ekfac import FitSettings, covariance_sums, fit_ekfac
from msif_core.models import discover_modules
from msif_core.query import measurement_gradients, query_ihvps
from msif_core.scoring import score_documents

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = "cuda"
DOCS = random_docs(7, 3, 9, seed=11)
PAIRS = random_pairs(6, (2, 4), (1, 4), seed=12)
LONG_DOCS = random_docs(5, 32, 45, seed=14)


def _fit_on_gpu_and_check(model, enc, settings: FitSettings) -> None:
    specs = discover_modules(model)
    gpu = copy.deepcopy(model).to(GPU)
    targets = sampled_targets(gpu, enc, settings.batch_size, settings.generator()) \
        if settings.fisher == "true" else None
    bf = BruteRun(gpu, specs, loss_closures(gpu, enc, targets))
    sums = covariance_sums(gpu, specs, enc, settings, PAD)
    assert sums.tokens == bf.tokens
    for s in specs:
        assert sums.a[s.name].device.type == "cuda"
        assert_scaled_close(sums.a[s.name].cpu(), bf.a_sum[s.name], f"A sum of {s.name}")
        assert_scaled_close(sums.s[s.name].cpu(), bf.s_sum[s.name], f"S sums of {s.name}")
    f = fit_ekfac(gpu, specs, enc, settings, PAD).to("cpu")
    for s in specs:
        assert_eigenbasis(f.q_a[s.name], bf.a_sum[s.name] / bf.tokens, f"Q_A of {s.name}")
    lam = bf.lam(f.q_a, f.q_s)
    for s in specs:
        assert_scaled_close(f.lam[s.name], lam[s.name], f"Λ of {s.name}")
    # the same draws on the CPU: the CPU fit's covariances agree up to the models' own CPU/GPU difference
    cpu = covariance_sums(model, specs, enc, settings, PAD)
    for s in specs:
        assert_scaled_close(cpu.a[s.name], sums.a[s.name].cpu(), f"CPU vs GPU A of {s.name}", tol=1e-5)
        assert_scaled_close(cpu.s[s.name], sums.s[s.name].cpu(), f"CPU vs GPU S of {s.name}", tol=1e-5)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_factors_match_cpu_brute_force(arch, fisher):
    model = tiny_model(arch, seed=1)
    for enc in (DOCS, PAIRS):
        _fit_on_gpu_and_check(model, enc, FitSettings(fisher=fisher, batch_size=3, seed=5))


@pytest.mark.parametrize("cache_mib", [0, 1024, None])
def test_gpu_long_sequence_factors_match_cpu_brute_force(cache_mib):
    _fit_on_gpu_and_check(tiny_model("llama", seed=1), LONG_DOCS,
                          FitSettings(fisher="true", batch_size=2, seed=3, cache_mib=cache_mib))


def test_automatic_pass_cache_budget_is_a_share_of_free_gpu_memory():
    from msif_core.ekfac import cache_budget

    free = torch.cuda.mem_get_info()[0]
    budget = cache_budget(FitSettings(), torch.device("cuda"))
    assert 0 < budget <= min(free // 4, 16 * 2**30) + 2**20


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_gpu_scores_equal_explicit_computation(arch):
    """MS-IF and SS-IF with models, factors and iHVPs on the GPU; the reference is explicit (autograd
    gradients of the GPU models, explicit Kronecker inverses on the CPU)."""
    w = world(arch)
    pt, ft = copy.deepcopy(w.pt).to(GPU), copy.deepcopy(w.ft).to(GPU)
    pt_f = fit_ekfac(pt, w.specs, w.docs, FitSettings(batch_size=3), PAD)
    ft_f = fit_ekfac(ft, w.specs, w.ftdata, FitSettings(batch_size=3, seed=1), PAD)
    pt_c, ft_c = pt_f.to("cpu"), ft_f.to("cpu")
    gm, gz_pt, gz_ft = (w.stack([sequence_grads(m, w.specs, fn) for fn in loss_closures(m, data)])
                        for m, data in ((ft, w.queries), (pt, w.docs), (ft, w.docs)))
    p_m = {n: explicit_precondition(ft_c, n, gm[n], DAMP_FT) for n in w.names}
    want = {"ss_if": w.explicit(p_m, gz_ft),
            "ms_if": w.explicit(p_m, {n: explicit_precondition(pt_c, n, gz_pt[n], DAMP_PT) for n in w.names})}
    grads = measurement_gradients(ft, w.specs, w.queries, batch_size=2, pad_id=PAD)
    for method, model in (("ss_if", ft), ("ms_if", pt)):
        for rank, strategy in ((0, "gradient"), (FULL_RANK, "low_rank"), (FULL_RANK, "gradient")):
            ih = query_ihvps(grads, w.specs, method, ft_factors=ft_f, pt_factors=pt_f, damping_ft=DAMP_FT,
                             damping_pt=DAMP_PT, rank=rank)
            res = score_documents(model, ih, w.docs, batch_size=3, pad_id=PAD, strategy=strategy)
            assert rel_err(res.scores, want[method]) < 1e-8, (method, rank, strategy)
        # factors left on the CPU (as the pipeline loads them) precondition GPU gradients all the same
        ih = query_ihvps(grads, w.specs, method, ft_factors=ft_c, pt_factors=pt_c, damping_ft=DAMP_FT,
                         damping_pt=DAMP_PT)
        assert rel_err(score_documents(model, ih, w.docs, batch_size=3, pad_id=PAD).scores, want[method]) < 1e-8
    # float32 on the GPU: the same scores to float32 accuracy
    ft32 = ft.float()
    ih = query_ihvps(measurement_gradients(ft32, w.specs, w.queries, batch_size=2, pad_id=PAD), w.specs, "ss_if",
                     ft_factors=ft_f, damping_ft=DAMP_FT)
    assert rel_err(score_documents(ft32, ih, w.docs, batch_size=3, pad_id=PAD).scores, want["ss_if"]) < 1e-3
