"""Half-precision models against float64: how far bf16 and fp16 runs of one tiny model move MS-IF, SS-IF
and GDP scores and the measurement gradients (the figures behind tests/core/test_half.py's tolerances).

Run:  .venv/bin/python bench/half_precision.py

The model and data are the test's (tests/helpers: a tiny GPT-NeoX, 12 documents, 8 fine-tuning pairs, 5
queries), the empirical Fisher (the true Fisher's sampled targets differ with the dtype). Row fields:
``dtype``, ``method``, ``score_rel_err`` (relative Frobenius error of the score matrix against the float64
run), ``grad_rel_err`` (largest over modules, of the measurement gradients). Rows go to
bench/results/half_precision.jsonl.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from rows import emit  # noqa: E402


def main() -> None:
    """float32, bf16 and fp16 against float64, per method."""
    from helpers.core import PAD, perturbed_copy, random_docs, random_pairs, rel_err, tiny_model

    from msif_core.ekfac import FitSettings, fit_ekfac
    from msif_core.models import discover_modules
    from msif_core.query import measurement_gradients, query_ihvps
    from msif_core.scoring import score_documents

    pt = tiny_model("gpt_neox", seed=7)
    ft = perturbed_copy(pt, 0.05)
    docs, ftdata = random_docs(12, 4, 10, seed=31), random_pairs(8, (2, 4), (1, 4), seed=32)
    queries = random_pairs(5, (2, 4), (2, 3), seed=33)

    def run(pt, ft, method):
        specs = discover_modules(pt)
        fs = FitSettings(batch_size=3, fisher="empirical")
        ptf, ftf = fit_ekfac(pt, specs, docs, fs, PAD), fit_ekfac(ft, specs, ftdata, fs, PAD)
        g = measurement_gradients(ft, specs, queries, pad_id=PAD)
        ih = query_ihvps(g, specs, method, ftf, ptf, 1e-3, "relative:0.1", 0)
        model = ft if method == "ss_if" else pt
        return score_documents(model, ih, docs, batch_size=3, pad_id=PAD).scores, g

    out = ROOT / "bench" / "results" / "half_precision.jsonl"
    for method in ("ms_if", "ss_if", "gdp"):
        ref, ref_g = run(pt, ft, method)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            got, g = run(copy.deepcopy(pt).to(dt), copy.deepcopy(ft).to(dt), method)
            emit({"dtype": str(dt).replace("torch.", ""), "method": method,
                  "score_rel_err": float(rel_err(got, ref)),
                  "grad_rel_err": max(float(rel_err(g[n].double().numpy(), ref_g[n].numpy())) for n in ref_g)}, out)


if __name__ == "__main__":
    main()
