"""The influence index's search at corpus scale (issue 12): Q query vectors against N synthetic index rows of
k numbers, each query's top K by inner product.

Run:  .venv/bin/python bench/index_search.py [--rows 1000000] [--queries 300] [--dims 256 1024 4096]
          [--top 100] [--dtype float16] [--ann-dims 1024] [--out bench/results/index_search.jsonl]

Per k: the rows are drawn (seeded Gaussian, stored in ``--dtype`` as the index would store them) in memory,
then :func:`msif_core.index.search` (the exact search the pipeline runs: float32 products, a step of rows at
a time) finds each query's top ``--top``; its seconds are the figure (the draw is not timed). With
``--ann-dims`` the same rows of that k go into a LanceDB table with an IVF-PQ index (LanceDB's own
approximate search; build seconds recorded) and are searched with several ``nprobes``; its recall@top is the
share of the exact top documents it returns. One row per (k, search) is appended to ``--out``.

Synthetic rows carry no structure (Gaussian), which is the hard case for an approximate index: real index
vectors cluster, so its recall here is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msif_core.index import search  # noqa: E402

log = logging.getLogger("index_search")


def draw_rows(n: int, k: int, dtype: str, seed: int = 0, step: int = 65536) -> np.ndarray:
    """[n, k] seeded Gaussian rows in ``dtype``, drawn a step at a time (memory holds the result only)."""
    out = np.empty((n, k), dtype=np.dtype(dtype))
    g = torch.Generator().manual_seed(seed)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        out[lo:hi] = torch.randn(hi - lo, k, generator=g).numpy().astype(out.dtype)
    return out


def exact_row(rows: np.ndarray, queries: np.ndarray, top: int) -> tuple[dict, np.ndarray]:
    """Time the exact search; its row and the positions it found [Q, top]."""
    search(queries, rows[:1000], top)  # warm the kernels
    t0 = time.perf_counter()
    pos, _ = search(queries, rows, top)
    secs = time.perf_counter() - t0
    n, k = rows.shape
    return {"search": "exact", "seconds": round(secs, 3),
            "gflops": round(2 * n * k * len(queries) / secs / 1e9, 1)}, pos


def ann_rows(rows: np.ndarray, queries: np.ndarray, top: int, exact: np.ndarray,
             nprobes: tuple[int, ...] = (10, 40, 160)) -> list[dict]:
    """LanceDB IVF-PQ over ``rows``: build seconds, then per nprobes the search seconds for every query and
    the recall of the exact top ``top``."""
    import lancedb
    import pyarrow as pa

    n, k = rows.shape
    out = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "out") as tmp:
        db = lancedb.connect(tmp)
        t0 = time.perf_counter()
        step = 65536
        tbl = None
        for lo in range(0, n, step):
            part = rows[lo:lo + step].astype(np.float32)
            batch = pa.table({"row": pa.array(np.arange(lo, lo + len(part))),
                              "vector": pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), k)})
            if tbl is None:
                tbl = db.create_table("index", batch)
            else:
                tbl.add(batch)
        write_s = time.perf_counter() - t0
        partitions = int(np.sqrt(n))
        t0 = time.perf_counter()
        tbl.create_index(metric="dot", num_partitions=partitions, num_sub_vectors=k // 16,
                         vector_column_name="vector")
        build_s = time.perf_counter() - t0
        log.info("IVF-PQ over %d rows of %d: write %.1fs, build %.1fs", n, k, write_s, build_s)
        for probes in nprobes:
            t0 = time.perf_counter()
            found = []
            for q in queries:
                hits = tbl.search(q.astype(np.float32)).distance_type("dot").nprobes(probes).limit(top) \
                    .select(["row"]).to_arrow()
                found.append(set(hits.column("row").to_pylist()))
            secs = time.perf_counter() - t0
            recall = float(np.mean([len(f & set(e.tolist())) / len(e) for f, e in zip(found, exact, strict=True)]))
            out.append({"search": "lancedb_ivf_pq", "partitions": partitions, "sub_vectors": k // 16,
                        "nprobes": probes, "seconds": round(secs, 3), "recall_at_top": round(recall, 4),
                        "write_seconds": round(write_s, 1), "build_seconds": round(build_s, 1)})
            log.info("nprobes %d: %.2fs, recall %.3f", probes, secs, recall)
    return out


def main() -> None:
    """Draw, search and record each configuration."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--ann-dims", type=int, nargs="*", default=[], help="also LanceDB IVF-PQ at these k")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "index_search.jsonl"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    for k in args.dims:
        rows = draw_rows(args.rows, k, args.dtype)
        queries = draw_rows(args.queries, k, "float32", seed=1)
        base = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": args.rows, "queries": args.queries,
                "dimensions": k, "top": args.top, "dtype": args.dtype, "threads": torch.get_num_threads(),
                "gib": round(rows.nbytes / 2**30, 2)}
        row, exact = exact_row(rows, queries, args.top)
        results = [row] + (ann_rows(rows, queries, args.top, exact) if k in args.ann_dims else [])
        with open(args.out, "a") as fh:
            for r in results:
                fh.write(json.dumps(base | r) + "\n")
                print(json.dumps(base | r))
        del rows


if __name__ == "__main__":
    main()
