"""Why the influence index needs many dimensions on the demo world: coordinate selection and other sketches.

Run:  .venv/bin/python bench/index_diagnostics.py [--queries 40] [--every 3] [--dimensions 4096,16384,65536]

On a subset (the first ``--queries`` test queries, every ``--every``-th document), the unprojected
whitened vectors (msif_core.index, Π = identity) give exact MS-IF. Against it, per damping and k, the
median per-query Spearman of: keeping the k eigenbasis coordinates with the largest Λ_pt, with the
largest document energy E[φ²], with the largest E[φ²]·E[ψ²] where ψ comes from the fine-tuning data
(fine-tune dependent, so not an index) or from the test queries themselves (an oracle); and, at
λ = 1e-4, a count sketch and (k ≤ 16384) a dense Gaussian projection of the same k. Rows go to
bench/results/index_diagnostics.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from fact_tracing import ensure_world, load_world  # noqa: E402
from index_quality import spearman_per_query  # noqa: E402
from rows import emit  # noqa: E402

from msif_core.api import AttributionSettings, encode_queries, fit_stage_factors, load_stages  # noqa: E402
from msif_core.data import encode_documents  # noqa: E402
from msif_core.index import Projection, document_vectors, query_vectors  # noqa: E402
from msif_core.query import measurement_gradients  # noqa: E402


def med(s: np.ndarray, exact: np.ndarray) -> float:
    """Median per-query Spearman of ``s`` against ``exact``."""
    return round(float(np.median(spearman_per_query(s, exact))), 3)


def main() -> None:
    """Compute and emit the rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="lakehouse/demo")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--dimensions", default="4096,16384,65536")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "index_diagnostics.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    w = ensure_world(Path(args.world))
    corpus, ft_data, q = load_world(w)
    q = q.head(args.queries)
    st = AttributionSettings(max_length=128, batch_size=16)
    pt, ft = load_stages(w / "models" / "pretrained", w / "models" / "finetuned", st)
    docs_all = encode_documents(pt.loaded.tokenizer, corpus.text.tolist(), 128)
    docs = docs_all.subset(range(0, len(docs_all), args.every))
    qenc = encode_queries(ft, q.prompt.tolist(), q.completion.tolist(), 128)
    fenc = encode_queries(ft, ft_data.prompt.tolist(), ft_data.completion.tolist(), 128)
    ptf, ftf = fit_stage_factors(pt, docs_all, st), fit_stage_factors(ft, fenc, st)
    specs, full = ft.specs, Projection(ft.specs, None)
    grads = measurement_gradients(ft.model, specs, qenc, 16, ft.pad_id)
    fgrads = measurement_gradients(ft.model, specs, fenc.subset(range(0, len(fenc), 4)), 16, ft.pad_id)
    base = {"documents": len(docs), "queries": len(qenc), "parameters": full.dimensions}
    rng = np.random.default_rng(0)
    for lam in (1e-4, 1e-2, "relative:0.1", "relative:1"):
        psi = query_vectors(grads, specs, ftf, ptf, full, lam, lam, True).astype(np.float64)
        phi = document_vectors(pt.model, specs, docs, ptf, full, lam, True, 16, pt.pad_id).vectors.astype(np.float64)
        fpsi = query_vectors(fgrads, specs, ftf, ptf, full, lam, lam, True).astype(np.float64)
        exact = phi @ psi.T
        e_phi, e_ft, e_test = (phi ** 2).mean(0), (fpsi ** 2).mean(0), (psi ** 2).mean(0)
        lamv = np.concatenate([ptf.lam[s.name].reshape(-1).double().numpy() for s in specs])
        cos = exact / np.linalg.norm(phi, axis=1)[:, None] / np.linalg.norm(psi, axis=1)[None]
        row = base | {"damping": str(lam), "median_abs_cosine": float(np.median(np.abs(cos))),
                      "participation_ratio_documents": float(e_phi.sum() ** 2 / (e_phi ** 2).sum())}
        for k in (int(x) for x in args.dimensions.split(",")):
            r = row | {"k": k}
            for name, crit in (("top_lambda", lamv), ("top_document_energy", e_phi),
                               ("top_energy_with_finetune_data", e_phi * e_ft), ("top_energy_oracle", e_phi * e_test)):
                idx = np.argsort(-crit)[:k]
                r[name] = med(phi[:, idx] @ psi[:, idx].T, exact)
            if lam == 1e-4:
                h, sg = rng.integers(0, k, phi.shape[1]), rng.choice([-1.0, 1.0], phi.shape[1])

                def sketch(x: np.ndarray, h: np.ndarray = h, sg: np.ndarray = sg, k: int = k) -> np.ndarray:
                    return np.stack([np.bincount(h, weights=row * sg, minlength=k) for row in x])

                r["count_sketch"] = med(sketch(phi) @ sketch(psi).T, exact)
                if k <= 16384:
                    acc_d, acc_q = np.zeros((phi.shape[0], k)), np.zeros((psi.shape[0], k))
                    for lo in range(0, phi.shape[1], 4096):
                        g = rng.standard_normal((min(4096, phi.shape[1] - lo), k)) / np.sqrt(k)
                        acc_d += phi[:, lo:lo + 4096] @ g
                        acc_q += psi[:, lo:lo + 4096] @ g
                    r["dense_gaussian"] = med(acc_d @ acc_q.T, exact)
                proj = Projection(specs, k, seed=0)
                kd = document_vectors(pt.model, specs, docs, ptf, proj, lam, True, 16, pt.pad_id).vectors
                kq = query_vectors(grads, specs, ftf, ptf, proj, lam, lam, True)
                r["kronecker"] = med(kd.astype(np.float64) @ kq.astype(np.float64).T, exact)
            emit(r, args.out)


if __name__ == "__main__":
    main()
