"""How close the influence index (msif_core.index) comes to exact MS-IF on the demo world, and what it costs.

Run:  .venv/bin/python bench/index_quality.py [--world lakehouse/demo] [--queries 300]
          [--dimensions 1024,4096,16384,65536] [--seeds 0] [--damping 1e-4] [--dtype float32,float16]
          [--split whitened,plain]

Every document of the demo world is scored for every test query by exact MS-IF (query iHVPs and one
fused scoring pass, damping ``--damping`` for both stages) and by the index at each number of
dimensions k, whitened (both sides carry (Λ_pt + λ)^(-1/2)) and plain (rotated gradient; all of P_pt on
the query side), with dot and cosine scores (document vectors divided by their projected norm, or by
the exact norm of the unprojected vector that the same pass computes: for the whitened index
√(∇ℓᵀ P_pt ∇ℓ), the self-influence). Per configuration: median
per-query Spearman correlation with exact MS-IF over all documents, MRR and Recall@10 of the ranking
(true sources, cutoff 100), and MRR after an exact MS-IF rerank of the index's top 100 per query.
Also timed: building the document vectors (:func:`msif_core.index.document_vectors`) against one plain
forward+backward pass over the same documents in the same batches. ``--dtype float16`` stores the document
vectors as the index would with ``[index] dtype = "float16"`` (unit rows in half precision times their
float32 norms, :func:`msif_core.index.encode_rows`) before scoring. Rows go to
bench/results/index_quality.jsonl (one per configuration), the table to stdout.

``--gdp``: also the gradient dot product from the same document vectors (method ``gdp_index``: query vectors
Π W⁻¹ ∇m, :func:`msif_core.index.query_vectors` with ``method="gdp"``; plain products, never divided by a
norm) against exact GDP over all documents, one row per k and split with ``score = "gdp"``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fact_tracing import ensure_world, load_world  # noqa: E402
from rows import emit  # noqa: E402

from msif_core.api import AttributionSettings, encode_queries, fit_stage_factors, load_stages  # noqa: E402
from msif_core.data import encode_documents, iter_batches  # noqa: E402
from msif_core.gradients import analysed_grads_only, forward_backward  # noqa: E402
from msif_core.index import Projection, document_vectors, encode_rows, query_vectors  # noqa: E402
from msif_core.metrics import evaluate_rankings  # noqa: E402
from msif_core.query import measurement_gradients, query_ihvps  # noqa: E402
from msif_core.scoring import score_documents  # noqa: E402

log = logging.getLogger("index_quality")


def spearman_per_query(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of columns a[:, j] and b[:, j] for every query j."""
    ra = np.argsort(np.argsort(a, axis=0), axis=0).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=0), axis=0).astype(np.float64)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    return (ra * rb).sum(0) / np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))


def products(docs: np.ndarray, queries: np.ndarray, step: int = 32768) -> np.ndarray:
    """docs @ queries.T in float64, a block of columns at a time (unprojected vectors are wide)."""
    out = np.zeros((docs.shape[0], queries.shape[0]))
    for lo in range(0, docs.shape[1], step):
        out += docs[:, lo:lo + step].astype(np.float64) @ queries[:, lo:lo + step].astype(np.float64).T
    return out


def reranked(index: np.ndarray, exact: np.ndarray, top: int) -> np.ndarray:
    """Exact scores on each query's top ``top`` documents by ``index``, −inf elsewhere."""
    out = np.full_like(exact, -np.inf)
    keep = np.argsort(-index, axis=0)[:top]
    cols = np.broadcast_to(np.arange(exact.shape[1]), keep.shape)
    out[keep, cols] = exact[keep, cols]
    return out


def main() -> None:
    """Score the demo world exactly and by the index; print and append the rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="lakehouse/demo", help="a built demo world (built if missing)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--dimensions", default="1024,4096,16384,65536,all",
                    help="numbers of dimensions; 'all': unprojected (exact; also gives the diagnostics)")
    ap.add_argument("--seeds", default="0", help="projection seeds (rows per seed)")
    ap.add_argument("--damping", type=float, default=1e-4, help="λ of both stages (the experiment default)")
    ap.add_argument("--rerank", type=int, default=100, help="index top-N reranked by exact MS-IF")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="storage of the document vectors, comma-separated")
    ap.add_argument("--split", default="whitened,plain", help="splits of P_pt to try, comma-separated")
    ap.add_argument("--gdp", action="store_true", help="also gdp_index against exact GDP (float32 rows only)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "index_quality.jsonl"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    world = ensure_world(Path(args.world))
    corpus, finetune, queries = load_world(world)
    queries = queries.head(args.queries)
    settings = AttributionSettings(max_length=128, batch_size=args.batch_size)
    pt, ft = load_stages(world / "models" / "pretrained", world / "models" / "finetuned", settings)
    docs = encode_documents(pt.loaded.tokenizer, corpus.text.tolist(), settings.max_length)
    doc_ids = corpus.doc_id.iloc[docs.kept].tolist()
    qenc = encode_queries(ft, queries.prompt.tolist(), queries.completion.tolist(), settings.max_length)
    fenc = encode_queries(ft, finetune.prompt.tolist(), finetune.completion.tolist(), settings.max_length)
    true_ids = queries.true_doc_ids.iloc[qenc.kept].tolist()
    pt_f, ft_f = fit_stage_factors(pt, docs, settings), fit_stage_factors(ft, fenc, settings)
    lam = args.damping
    specs = ft.specs
    n_params = sum(s.out_features * s.d for s in specs)

    t = time.perf_counter()
    grads = measurement_gradients(ft.model, specs, qenc, settings.batch_size, ft.pad_id)
    ih = query_ihvps(grads, specs, "ms_if", ft_f, pt_f, lam, lam)
    exact = score_documents(pt.model, ih, docs, settings.batch_size, pt.pad_id).scores
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    with analysed_grads_only(pt.model, pt.specs):
        for batch in iter_batches(docs, settings.batch_size, pt.pad_id):
            forward_backward(pt.model, pt.specs, batch, fisher="empirical")
    plain_s = time.perf_counter() - t

    methods: dict[str, np.ndarray] = {"ms_if (exact)": exact}
    if args.gdp:
        methods["gdp (exact)"] = score_documents(pt.model, query_ihvps(grads, specs, "gdp"), docs,
                                                 settings.batch_size, pt.pad_id).scores
    base = dict(world=str(world), documents=len(doc_ids), queries=len(true_ids), analysed_parameters=n_params,
                damping=lam, exact_ms_if_s=round(exact_s, 1), plain_pass_s=round(plain_s, 2))
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for k in args.dimensions.split(","):
            proj = Projection(specs, None if k == "all" else int(k), seed=seed)
            for whiten, dtype in ((w == "whitened", d) for w in args.split.split(",") for d in args.dtype.split(",")):
                t = time.perf_counter()
                dv = document_vectors(pt.model, specs, docs, pt_f, proj, lam, whiten, settings.batch_size,
                                      pt.pad_id)
                stored, scale = encode_rows(dv.vectors, dtype)
                phi = stored.astype(np.float32) if scale is None else stored.astype(np.float32) * scale[:, None]
                build_s = time.perf_counter() - t
                t = time.perf_counter()
                psi = query_vectors(grads, specs, ft_f, pt_f, proj, lam, lam, whiten)
                query_s = time.perf_counter() - t
                for cosine in ("dot", "cosine", "cosine-exact-norm"):
                    sc = products(phi, psi)  # cosine: each document's row divided by its norm
                    if cosine != "dot":
                        norms = np.linalg.norm(phi, axis=1) if cosine == "cosine" else np.sqrt(dv.sq_norms)
                        sc /= np.where(norms > 0, norms, 1.0)[:, None]
                    name = (f"index k={proj.dimensions} {'whitened' if whiten else 'plain'} {cosine} seed={seed}"
                            + ("" if dtype == "float32" else f" {dtype}"))
                    methods[name] = sc
                    methods[name + f" +rerank{args.rerank}"] = reranked(sc, exact, args.rerank)
                    rho = spearman_per_query(sc, exact)
                    if k == "all" and cosine == "dot" and whiten:  # how spread out the scores are
                        cos = sc / np.sqrt(dv.sq_norms)[:, None] / np.linalg.norm(psi, axis=1)[None]
                        e = np.mean(phi * phi, axis=0, dtype=np.float64)
                        base |= {"median_abs_cosine": float(np.median(np.abs(cos))),
                                 "max_abs_cosine": float(np.abs(cos).max()),
                                 "participation_ratio_documents": float(e.sum() ** 2 / (e ** 2).sum())}
                    rows.append(dict(base, method=name, dimensions=proj.dimensions, requested=k, seed=seed,
                                     whiten=whiten, dtype=dtype, score=cosine,
                                     median_spearman=round(float(np.median(rho)), 4),
                                     q10_spearman=round(float(np.quantile(rho, 0.1)), 4),
                                     build_s=round(build_s, 2), build_vs_plain=round(build_s / plain_s, 2),
                                     query_vectors_s=round(query_s, 2)))
                if args.gdp and dtype == "float32":
                    sc = products(phi, query_vectors(grads, specs, None, pt_f, proj, damping_pt=lam, whiten=whiten,
                                                     method="gdp"))
                    name = f"gdp_index k={proj.dimensions} {'whitened' if whiten else 'plain'} seed={seed}"
                    methods[name] = sc
                    methods[name + f" +rerank{args.rerank}"] = reranked(sc, methods["gdp (exact)"], args.rerank)
                    rho = spearman_per_query(sc, methods["gdp (exact)"])
                    rows.append(dict(base, method=name, dimensions=proj.dimensions, requested=k, seed=seed,
                                     whiten=whiten, dtype=dtype, score="gdp",
                                     median_spearman=round(float(np.median(rho)), 4),
                                     q10_spearman=round(float(np.quantile(rho, 0.1)), 4),
                                     build_s=round(build_s, 2), build_vs_plain=round(build_s / plain_s, 2)))
    table = evaluate_rankings(methods, doc_ids, true_ids).set_index("method")
    for row in rows:
        m = row["method"]
        if row["score"] == "gdp":
            row.update(exact_gdp_mrr=round(float(table.loc["gdp (exact)", "mrr"]), 4),
                       exact_gdp_recall_at_10=round(float(table.loc["gdp (exact)", "recall_at_10"]), 4))
        row.update(mrr=round(float(table.loc[m, "mrr"]), 4), recall_at_10=round(float(table.loc[m, "recall_at_10"]), 4),
                   mrr_rerank=round(float(table.loc[m + f" +rerank{args.rerank}", "mrr"]), 4),
                   exact_mrr=round(float(table.loc["ms_if (exact)", "mrr"]), 4),
                   exact_recall_at_10=round(float(table.loc["ms_if (exact)", "recall_at_10"]), 4))
        emit(row, args.out)
    cols = ["dimensions", "whiten", "dtype", "score", "median_spearman", "mrr", "recall_at_10", "mrr_rerank",
            "build_vs_plain"]
    print(pd.DataFrame(rows)[cols].to_markdown(index=False, floatfmt=".3f"))
    print(json.dumps({k: v for k, v in rows[-1].items() if k in base or k.startswith("exact")}))


if __name__ == "__main__":
    main()
