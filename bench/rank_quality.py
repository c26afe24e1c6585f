"""How close module-rank-r query iHVPs come to exact MS-IF on the demo world.

Run:  .venv/bin/python bench/rank_quality.py [--world lakehouse/demo] [--ranks 0,16,32,64,128]

On the demo world (built by ``make demo`` or ``bench/train_demo.py``), both stages' EK-FAC factors are
fitted once (every document, the fine-tuning pairs), then every document is scored for every query with
exact query iHVPs (rank 0) and with module-level rank-r ones (``msif_core.query.low_rank_module``). Per
rank: the median and 10th percentile over queries of the Spearman correlation of the document scores
with the exact ones, the MRR and Recall@10 against the true sources, and the MiB a query's iHVPs take.
Rows go to bench/results/rank_quality.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rows import emit  # noqa: E402


def main() -> None:
    """Fit once, score at every rank, print and append one row per rank."""
    from scipy.stats import spearmanr

    from msif_assets.io import read_records
    from msif_core.api import AttributionSettings, encode_queries, fit_stage_factors, gradient_tables, load_stages
    from msif_core.data import encode_documents
    from msif_core.memory import retain_freed_memory
    from msif_core.metrics import evaluate_rankings
    from msif_core.plan import query_bytes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default=str(ROOT / "lakehouse" / "demo"))
    ap.add_argument("--ranks", default="0,16,32,64,128")
    ap.add_argument("--damping", type=float, default=1e-4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rank_quality.jsonl"))
    args = ap.parse_args()
    retain_freed_memory()
    world = Path(args.world)
    base = AttributionSettings(max_length=128, batch_size=32, damping_pretrain=args.damping,
                               damping_finetune=args.damping, methods=("ms_if",))
    pt, ft = load_stages(world / "models" / "pretrained", world / "models" / "finetuned", base)
    corpus = read_records(world / "data" / "corpus.parquet", "corpus", ("doc_id", "text"))
    q = read_records(world / "data" / "queries.jsonl", "queries", ("query_id", "prompt", "completion"))
    ftd = read_records(world / "data" / "finetune.jsonl", "finetuning", ("prompt", "completion"))
    docs = encode_documents(pt.loaded.tokenizer, corpus.text.tolist(), base.max_length)
    doc_ids = corpus.doc_id.iloc[docs.kept].astype(str).tolist()
    qenc = encode_queries(ft, q.prompt.tolist(), q.completion.tolist(), base.max_length)
    qids = q.query_id.iloc[qenc.kept].astype(str).tolist()
    truth = {str(r.query_id): list(r.true_doc_ids) for r in q.itertuples()}
    t0 = time.perf_counter()
    ptf = fit_stage_factors(pt, docs, base)
    ftf = fit_stage_factors(ft, encode_queries(ft, ftd.prompt.tolist(), ftd.completion.tolist(), base.max_length),
                            base)
    print(f"fitted both stages in {time.perf_counter() - t0:.0f}s", flush=True)
    exact = None
    for rank in (int(r) for r in args.ranks.split(",")):
        s = AttributionSettings(**{**base.__dict__, "query_rank": rank})
        t0 = time.perf_counter()
        table = gradient_tables(pt, ft, qenc, qids, docs, doc_ids, s, ptf, ftf)["ms_if"]
        secs = time.perf_counter() - t0
        m = table.pivot(index="doc_id", columns="query_id", values="score").loc[doc_ids, qids].to_numpy()
        if exact is None:
            exact = m
        rho = np.array([spearmanr(m[:, j], exact[:, j]).statistic for j in range(len(qids))])
        quality = evaluate_rankings({"ms_if": m}, doc_ids, [truth[x] for x in qids], query_ids=qids).iloc[0]
        row = {"rank": rank, "queries": len(qids), "documents": len(doc_ids), "damping": args.damping,
               "spearman_median": round(float(np.median(rho)), 4),
               "spearman_p10": round(float(np.quantile(rho, 0.1)), 4),
               "mrr": round(float(quality["mrr"]), 4), "recall_at_10": round(float(quality["recall_at_10"]), 4),
               "mib_per_query": round(query_bytes(ft.specs, rank, 16, 4) / 2**20, 3), "seconds": round(secs, 1)}
        emit(row, args.out)


if __name__ == "__main__":
    main()
