"""Half-precision models: the model's passes run in bf16/fp16, while covariances, Λ, query iHVPs and scores
are accumulated and kept in float32. Checked against the same model in float64 (the float64 run is the
exact reference here; a bf16 forward pass alone moves the measurement gradients by ~1%).

The empirical Fisher is used: the true Fisher samples targets from the model's own probabilities, which
differ with the dtype, so its draws (and factors) differ by far more than rounding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.core import PAD, perturbed_copy, random_docs, random_pairs, rel_err, tiny_model

from msif_core.ekfac import FitSettings, fit_ekfac
from msif_core.models import discover_modules
from msif_core.query import measurement_gradients, query_ihvps
from msif_core.scoring import score_documents

# bf16 keeps 8 bits of mantissa (fp16 11): the models' own forward/backward rounding bounds how close
# any half-precision run can come; the stated tolerances are a few times what float32 accumulation gives
# measured: ~0.04 (bf16) and ~0.005 (fp16); float32 2e-6
TOLERANCE = {torch.bfloat16: 0.08, torch.float16: 0.02}  # relative Frobenius error of the score matrix
MIN_SPEARMAN = {torch.bfloat16: 0.9, torch.float16: 0.97}  # median per query


def _run(pt, ft, docs, ftdata, queries, rank: int):
    specs = discover_modules(pt)
    settings = FitSettings(batch_size=3, fisher="empirical")
    ptf = fit_ekfac(pt, specs, docs, settings, PAD)
    ftf = fit_ekfac(ft, specs, ftdata, settings, PAD)
    grads = measurement_gradients(ft, specs, queries, pad_id=PAD)
    ih = query_ihvps(grads, specs, "ms_if", ftf, ptf, 1e-3, "relative:0.1", rank)
    res = score_documents(pt, ih, docs, batch_size=3, pad_id=PAD)
    return ptf, ih, res


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort(0).argsort(0), b.argsort(0).argsort(0)
    return float(np.median([np.corrcoef(ra[:, q], rb[:, q])[0, 1] for q in range(a.shape[1])]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [0, 2])
def test_half_precision_model_within_tolerance_of_float64(dtype: torch.dtype, rank: int) -> None:
    pt = tiny_model("gpt_neox", seed=7)
    ft = perturbed_copy(pt, 0.05)
    docs, ftdata = random_docs(12, 4, 10, seed=31), random_pairs(8, (2, 4), (1, 4), seed=32)
    queries = random_pairs(5, (2, 4), (2, 3), seed=33)
    ref_f, ref_ih, ref = _run(pt, ft, docs, ftdata, queries, rank)
    half_f, half_ih, half = _run(copy.deepcopy(pt).to(dtype), copy.deepcopy(ft).to(dtype), docs, ftdata, queries,
                                 rank)
    # what msif keeps is float32 (Λ as fitted: float64 sums), never the model's 8- or 11-bit mantissa
    assert all(x.dtype == torch.float64 for x in half_f.lam.values())
    assert all(x.dtype == torch.float32 for d in (half_ih.dense, half_ih.u, half_ih.v) for x in d.values())
    assert np.isfinite(half.scores).all()
    err = rel_err(half.scores, ref.scores)
    assert err < TOLERANCE[dtype], (dtype, rank, err)
    assert _spearman(half.scores, ref.scores) >= MIN_SPEARMAN[dtype]
    lam_err = max(rel_err(half_f.lam[n].numpy(), ref_f.lam[n].numpy()) for n in ref_f.lam)
    assert lam_err < 4 * TOLERANCE[dtype], lam_err
