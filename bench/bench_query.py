"""Speed of the query side: measurement gradients and their iHVPs for 64 queries.

Run:  .venv/bin/python bench/bench_query.py [--size large] [--query-length 64] [--queries 64]

Compares, on one GPT-NeoX (random weights and tokens; speed does not depend on the values), msif's
query iHVPs with the plain way of computing the same numbers:

- ``tokens``: what ``query_ihvps`` does with ``measurement_gradients``' output: each query's tokens are
  rotated into the eigenbasis (``Factors.precondition_tokens``) and MS-IF changes from the fine-tune's
  eigenbasis to the pre-train's with one rotation (``then=``);
- ``dense``: each query's dense [P, d] gradient rotated in and back out by each stage in turn
  (``Factors.precondition`` of ``Factors.precondition``), as kronfluence does for one stage.

Each is timed twice, the best kept. Both give the same iHVPs (the largest relative difference is
printed). Results go to bench/out/query.json and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_core import SIZES, VOCAB  # noqa: E402

from msif_core.data import Encoded  # noqa: E402
from msif_core.ekfac import FitSettings, fit_ekfac  # noqa: E402
from msif_core.memory import retain_freed_memory  # noqa: E402
from msif_core.models import discover_modules  # noqa: E402
from msif_core.query import measurement_gradients, query_ihvps  # noqa: E402


def _time(fn, repeat: int = 2):
    """(result, best time of ``repeat`` runs): the first run also pays the first touch of its memory."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    """Measure and print one row per method."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="large", choices=sorted(SIZES))
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--query-length", type=int, default=64, help="tokens per query (half prompt, half completion)")
    ap.add_argument("--fit-docs", type=int, default=8, help="128-token documents each factor set is fitted on")
    ap.add_argument("--out", default="bench/out/query.json")
    args = ap.parse_args()
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    retain_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=max(args.query_length, 128), **SIZES[args.size])
    model = GPTNeoXForCausalLM(cfg).eval()
    specs = discover_modules(model)

    def docs(seed: int) -> Encoded:
        ids = torch.randint(0, VOCAB, (args.fit_docs, 128), generator=torch.Generator().manual_seed(seed))
        return Encoded(ids.tolist(), [[False] + [True] * 127] * args.fit_docs)

    ft = fit_ekfac(model, specs, docs(1), FitSettings(batch_size=8))
    pt = fit_ekfac(model, specs, docs(2), FitSettings(batch_size=8))
    n, t = args.queries, args.query_length
    ids = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(3))
    queries = Encoded(ids.tolist(), [[False] * (t // 2) + [True] * (t - t // 2)] * n)
    measurement_gradients(model, specs, queries.subset(range(min(n, 8))), 8)  # warm-up
    grads, grads_s = _time(lambda: measurement_gradients(model, specs, queries, 8))
    _, dense_s = _time(lambda: {s.name: grads[s.name] for s in specs})
    rows = []
    for method in ("ss_if", "ms_if"):
        ih, tok_s = _time(lambda method=method: query_ihvps(grads, specs, method, ft, pt, 1e-4, 1e-4))

        def plain(method: str = method) -> dict[str, torch.Tensor]:
            out = {}
            for s in specs:
                g = ft.precondition(s.name, grads[s.name], 1e-4)
                out[s.name] = pt.precondition(s.name, g, 1e-4) if method == "ms_if" else g
            return out

        ref, plain_s = _time(plain)
        diff = max(float((ih.matrix(k) - ref[k]).norm() / ref[k].norm()) for k in ref)
        rows.append({"size": args.size, "block_params": sum(s.out_features * s.d for s in specs), "queries": n,
                     "query_tokens": t, "method": method, "measurement_grads_s": grads_s,
                     "dense_grads_s": dense_s, "ihvps_tokens_s": tok_s, "ihvps_dense_s": plain_s,
                     "speedup": plain_s / tok_s, "max_rel_diff": diff})
        print(json.dumps(rows[-1]), flush=True)
        del ih, ref
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    cols = ["size", "method", "queries", "query_tokens", "measurement_grads_s", "dense_grads_s", "ihvps_tokens_s",
            "ihvps_dense_s", "speedup", "max_rel_diff"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
