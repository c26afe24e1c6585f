"""How close does EK-FAC come to an exact solve? (paper section 5.1, table 1)

Run:  .venv/bin/python bench/approximation_quality.py --world bench/out/demo --fit 32 --damping-mult 10

Single-stage influence on the demo world's pre-trained model: 10 query documents x 500 candidate
documents. The reference solves (G + λI) x = ∇m exactly, G the Gauss-Newton matrix of the fitting
documents (conjugate gradient with exact GGN-vector products, full batch, to convergence;
``msif_core.exact``). EK-FAC (all blocks, and MLP only) and GDP are compared to it by Spearman and
Pearson correlation per query (then averaged), with the wall-clock time of each. λ is the same
absolute number for both: ``--damping-mult`` × the mean EK-FAC eigenvalue over all blocks. The
script also estimates the largest eigenvalue of G (power iteration), hence the condition number
(λ_max + λ)/λ that decides how many CG iterations convergence takes, and checks that the reference is
settled: the Spearman correlation of the scores from half the CG iterations with the final ones.
Writes bench/out/approximation_quality.json and prints a table.
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

from msif_core.checkpoints import load_model  # noqa: E402
from msif_core.data import Encoded, encode_documents  # noqa: E402
from msif_core.ekfac import FitSettings, fit_ekfac  # noqa: E402
from msif_core.exact import (  # noqa: E402
    GaussNewtonOperator,
    cg_solve,
    param_names_for_modules,
    score_candidates,
    sequence_gradients,
)
from msif_core.models import discover_modules  # noqa: E402
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
    ap.add_argument("--fit", type=int, default=32, help="fitting documents (EK-FAC and the exact GGN)")
    ap.add_argument("--fisher-samples", type=int, default=8, help="true-Fisher draws per fitting document")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--damping-mult", type=float, default=10.0, help="λ = this × mean Λ (absolute, same for all)")
    ap.add_argument("--tol", type=float, default=1e-6, help="CG relative residual")
    ap.add_argument("--more-draws", type=int, nargs="*", default=[32],
                    help="also fit EK-FAC with these numbers of true-Fisher draws per document")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--out", default="bench/out/approximation_quality.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    world = Path(args.world)
    if not (world / "models" / "pretrained").exists():
        from msif_demo import build_demo

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
    names = param_names_for_modules(model, [s.name for s in specs])

    def fit_factors(blocks: str, draws: int):
        sp = discover_modules(model, attention_blocks=blocks)
        t0 = time.perf_counter()
        f = fit_ekfac(model, sp, repeat(fit, draws), FitSettings(fisher="true", batch_size=16), pad)
        return sp, f, time.perf_counter() - t0

    base = fit_factors("per_head", args.fisher_samples)
    lam_mean = float(torch.cat([v.flatten() for v in base[1].lam.values()]).mean())
    damping = args.damping_mult * lam_mean  # one absolute λ for the reference and every variant
    op = GaussNewtonOperator(model, names, fit, batch_size=16, max_columns=16, pad_id=pad)
    v = torch.randn(op.n_params, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(20):  # power iteration: λ_max(G)
        w = op(v)
        top = float((v * w).sum() / (v * v).sum())
        v = w / w.norm()
    kappa = (top + damping) / damping
    log.info("mean Λ %.3g, damping %.3g, λ_max(G) ≈ %.3g, condition number ≈ %.3g", lam_mean, damping, top, kappa)

    cache = Path(args.out).with_name(f"cg_reference_x{args.damping_mult:g}_f{args.fit}_q{args.queries}"
                                     f"_c{args.candidates}_l{args.max_length}_t{args.tol:g}.npz")
    if cache.exists() and abs(float(np.load(cache)["damping"]) - damping) <= 1e-12 * damping:
        z = np.load(cache)
        ref, t_cg, cg_info = z["ref"], float(z["seconds"]), json.loads(str(z["info"]))
        log.info("reusing the CG reference in %s", cache)
    else:
        t0 = time.perf_counter()
        q_grads = sequence_gradients(model, names, queries, pad_id=pad).T.contiguous()
        cg = cg_solve(op, q_grads, damping, tol=args.tol, max_iter=args.max_iter, log_every=25)
        ref = score_candidates(model, names, cands, cg.x, pad)
        t_cg = time.perf_counter() - t0
        # settled? the same solve stopped at half the iterations ranks the candidates the same way
        cg_half = cg_solve(op, q_grads, damping, tol=0.0, max_iter=max(1, max(cg.iterations) // 2), log_every=0)
        half = score_candidates(model, names, cands, cg_half.x, pad)
        cg_info = {"cg_iterations": max(cg.iterations), "cg_converged": cg.converged,
                   "cg_relative_residual": max(cg.residuals), "cg_half_iterations": max(cg_half.iterations),
                   "cg_half_spearman_vs_final": correlations(half, ref)[0]}
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, ref=ref, seconds=t_cg, damping=damping, info=json.dumps(cg_info))

    rows = []
    variants = [("EK-FAC", "per_head", args.fisher_samples, base)]
    for draws in args.more_draws:
        variants.append((f"EK-FAC, {draws} draws", "per_head", draws, None))
    variants.append(("EK-FAC, fused q/k/v", "fused", args.fisher_samples, None))
    share = None
    for label, blocks, draws, fitted in variants:
        sp, factors, t_fit = fitted or fit_factors(blocks, draws)
        t0 = time.perf_counter()
        grads = measurement_gradients(model, sp, queries, 16, pad)
        ek = score_documents(model, query_ihvps(grads, sp, "ss_if", factors, damping_ft=damping), cands, 16, pad)
        t_pairs = time.perf_counter() - t0
        for name, est in ((label, ek.scores), (f"{label} (MLP only)", ek.part("mlp"))):
            if name.endswith("(MLP only)") and fitted is None:
                continue
            spear, pear = correlations(est, ref)
            rows.append({"method": name, "attention_blocks": blocks, "fisher_draws": draws, "spearman": spear,
                         "pearson": pear, "overhead_s": t_fit, "pairwise_s": t_pairs})
        if share is None:
            share = float(np.abs(ek.part("mlp")).sum() / np.abs(ek.by_block).sum())
    t0 = time.perf_counter()
    grads = measurement_gradients(model, specs, queries, 16, pad)
    gdp = score_documents(model, query_ihvps(grads, specs, "gdp"), cands, 16, pad)
    t_gdp = time.perf_counter() - t0
    for name, est, over, pair in (("GDP", gdp.scores, 0.0, t_gdp), ("CG (reference)", ref, 0.0, t_cg)):
        spear, pear = correlations(est, ref)
        rows.append({"method": name, "attention_blocks": "", "fisher_draws": 0, "spearman": spear, "pearson": pear,
                     "overhead_s": over, "pairwise_s": pair})
    res = {"fit_documents": len(fit), "fit_tokens": fit.n_tokens, "queries": len(queries),
           "candidates": len(cands), "damping": damping, "damping_mult": args.damping_mult,
           "mean_lambda": lam_mean, "max_lambda": max(float(x.max()) for x in base[1].lam.values()),
           "lambda_max_G": top, "condition_number": kappa, **cg_info,
           "analysed_parameters": sum(s.out_features * s.d for s in specs), "mlp_share_of_abs_influence": share,
           "rows": rows}
    out = Path(args.out)
    if out.suffix == ".json" and args.damping_mult != 10.0:
        out = out.with_name(f"{out.stem}_x{args.damping_mult:g}.json")
    args.out = str(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
