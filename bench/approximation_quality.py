"""How close does EK-FAC come to an exact solve? (paper section 5.1, table 1)

Run:  .venv/bin/python bench/approximation_quality.py [--world DIR] [--fit 64] [--candidates 500]

Single-stage influence on the demo world's pre-trained model: 10 query documents x 500 candidate
documents. The reference solves (G + λI) x = ∇m exactly, G the Gauss-Newton matrix of the fitting
documents (conjugate gradient with exact GGN-vector products, full batch, to convergence;
``msif_core.exact``). EK-FAC (all blocks, and MLP only) and GDP are compared to it by Spearman and
Pearson correlation per query (then averaged), with the wall-clock time of each. λ is the same
absolute number for both: by default 0.1 × the mean EK-FAC eigenvalue over all blocks, so that CG
converges in minutes on a CPU. Writes bench/out/approximation_quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msif_core.data import Encoded, encode_documents  # noqa: E402
from msif_core.ekfac import FitSettings, fit_ekfac  # noqa: E402
from msif_core.exact import exact_influence, param_names_for_modules  # noqa: E402
from msif_core.models import discover_modules, load_model  # noqa: E402
from msif_core.query import measurement_gradients, query_ihvps  # noqa: E402
from msif_core.scoring import score_documents  # noqa: E402

log = logging.getLogger("approximation_quality")


def repeat(enc: Encoded, k: int) -> Encoded:
    """``enc`` k times over (more true-Fisher draws per sequence; the GGN is their expectation)."""
    return enc.subset([i for _ in range(k) for i in range(len(enc))])


def correlations(est: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Mean over queries of Spearman and Pearson correlation between two [candidates, queries] matrices."""
    sp = [spearmanr(est[:, j], ref[:, j]).statistic for j in range(ref.shape[1])]
    pe = [pearsonr(est[:, j], ref[:, j]).statistic for j in range(ref.shape[1])]
    return float(np.mean(sp)), float(np.mean(pe))


def main() -> None:
    """Fit, solve, compare."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="lakehouse/demo")
    ap.add_argument("--fit", type=int, default=64, help="fitting documents (EK-FAC and the exact GGN)")
    ap.add_argument("--fisher-samples", type=int, default=8, help="true-Fisher draws per fitting document")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--damping", type=float, default=None, help="absolute λ (default 0.1 x mean Λ)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--out", default="bench/out/approximation_quality.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    world = Path(args.world)
    if not (world / "models" / "pretrained").exists():
        from dagster_project.demo_world import build_demo

        build_demo(world)
    lm = load_model(world / "models" / "pretrained", dtype=torch.float64)
    model, tok = lm.model, lm.tokenizer
    corpus = pd.read_parquet(world / "data" / "corpus.parquet")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(corpus))
    need = args.fit + args.queries + args.candidates
    if need > len(corpus):
        raise SystemExit(f"the world has {len(corpus)} documents; {need} are needed")
    texts = corpus.text.to_numpy()
    fit = encode_documents(tok, texts[order[:args.fit]].tolist(), args.max_length)
    queries = encode_documents(tok, texts[order[args.fit:args.fit + args.queries]].tolist(), args.max_length)
    cands = encode_documents(tok, texts[order[args.fit + args.queries:need]].tolist(), args.max_length)
    pad = int(tok.pad_token_id or 0)
    specs = discover_modules(model)
    rows, res = [], {}

    t0 = time.perf_counter()
    factors = fit_ekfac(model, specs, repeat(fit, args.fisher_samples), FitSettings(fisher="true", batch_size=16),
                        pad)
    t_fit = time.perf_counter() - t0
    lam_mean = float(torch.cat([v.flatten() for v in factors.lam.values()]).mean())
    damping = args.damping if args.damping is not None else 0.1 * lam_mean
    log.info("mean Λ %.3g, damping %.3g", lam_mean, damping)

    t0 = time.perf_counter()
    names = param_names_for_modules(model, [s.name for s in specs])
    ref = exact_influence(model, names, fit, queries, cands, damping, max_iter=args.max_iter, pad_id=pad)
    t_cg = time.perf_counter() - t0

    t0 = time.perf_counter()
    grads = measurement_gradients(model, specs, queries, 16, pad)
    ek = score_documents(model, query_ihvps(grads, specs, "ss_if", factors, damping_ft=damping), cands, 16, pad)
    t_pairs = time.perf_counter() - t0
    t0 = time.perf_counter()
    gdp = score_documents(model, query_ihvps(grads, specs, "gdp"), cands, 16, pad)
    t_gdp = time.perf_counter() - t0

    methods = (("EK-FAC", ek.scores, t_fit, t_pairs), ("EK-FAC (MLP)", ek.part("mlp"), t_fit, t_pairs),
               ("GDP", gdp.scores, 0.0, t_gdp), ("CG (reference)", ref, 0.0, t_cg))
    for name, est, over, pair in methods:
        sp, pe = correlations(est, ref)
        rows.append({"method": name, "spearman": sp, "pearson": pe, "overhead_s": over, "pairwise_s": pair})
    share = float(np.abs(ek.part("mlp")).sum() / np.abs(ek.by_block).sum())
    res = {"fit_documents": len(fit), "fisher_samples": args.fisher_samples, "queries": len(queries),
           "candidates": len(cands), "damping": damping, "mean_lambda": lam_mean,
           "analysed_parameters": sum(s.out_features * s.d for s in specs), "mlp_share_of_abs_influence": share,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
