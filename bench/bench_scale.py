"""Attribution at real model sizes within a memory budget, whatever the number of queries.

Run:  .venv/bin/python bench/bench_scale.py [--shape pythia-160m] [--queries 25,100,200] [--ranks 0,32]
          [--docs 64] [--doc-length 256] [--memory-gib 8] [--methods ms_if] [--device cpu] [--dtype float32]

On a GPT-NeoX of a Pythia shape with random weights (built locally from a config, nothing downloaded)
and a perturbed copy as the "fine-tuned" model, both stages' EK-FAC factors are fitted once (on
``--fit-docs`` random documents) and saved; then every (rank, number of queries) configuration runs in a
fresh process that loads them and calls ``msif_core.api.gradient_tables`` (the memory plan: query
chunks, module-rank iHVPs, one pass over the documents per chunk). Each row reports the plan (chunks,
queries per chunk, MiB per query), the peak resident memory of that process (``ru_maxrss``), the
seconds of the query side and of the scoring passes, and the time per document per chunk against one
plain forward+backward pass over the same documents in the same batches (run after the attribution, so
that the peak is the attribution's). Factors are read module by module (``--eager-factors``: both stages'
at once, as before). Rows go to bench/results/scale.jsonl.

Shapes: pythia-160m (hidden 768, 12 layers, 85M analysed parameters), pythia-410m (1024, 24 layers,
~300M, the size of the paper's BLOOM-560m), dolly-3b (2560, 32 layers; a GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rows import emit  # noqa: E402

SHAPES = {
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "dolly-3b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240),
}
VOCAB = 50304


def _model(shape: str, seed: int, dtype: torch.dtype, device: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=2048, pad_token_id=0, **SHAPES[shape])
    return GPTNeoXForCausalLM(cfg).to(device, dtype).eval()


def _perturbed(model, scale: float = 0.02, seed: int = 1):
    import copy

    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * p.float().std() * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return ft


def _docs(n: int, length: int, seed: int):
    from msif_core.data import Encoded

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g).tolist()
    return Encoded(ids, [[True] * length for _ in ids])


def _queries(n: int, length: int, seed: int):
    from msif_core.data import Encoded

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g).tolist()
    half = length // 2
    return Encoded(ids, [[False] * half + [True] * (length - half) for _ in ids])


def synthetic_factors(specs, seed: int):
    """Factors of the right shapes whose values are not fitted: random orthonormal bases (QR of Gaussian
    matrices) and Λ uniform in [0.1, 1.1), stored in float32. What attribution costs in memory and time does
    not depend on the values, and fitting both stages at Pythia-410M's shape takes about an hour on a 2-core
    CPU (96 float64 eigendecompositions of 4096 x 4096); ``--synthetic-factors`` uses these, and rows say so."""
    from msif_core.ekfac import FACTORS_FORMAT, Factors

    g = torch.Generator().manual_seed(seed)
    q_a, q_s, lam = {}, {}, {}
    for s in specs:
        q_a[s.name] = torch.linalg.qr(torch.randn(s.d, s.d, generator=g)).Q  # float32, as a float32 run reads
        q_s[s.name] = torch.linalg.qr(torch.randn(s.n_blocks, s.p, s.p, generator=g)).Q
        lam[s.name] = torch.rand(s.n_blocks, s.p, s.d, generator=g) + 0.1
    return Factors({s.name: s for s in specs}, q_a, q_s, lam, {"format": FACTORS_FORMAT, "synthetic": True})


def prepare(args) -> Path:
    """Fit and save both stages' factors once (the slow part every configuration shares)."""
    from msif_core.ekfac import FitSettings, fit_ekfac
    from msif_core.models import discover_modules

    out = ROOT / "bench" / "out" / f"scale_{args.shape}_{args.dtype}{'_synthetic' if args.synthetic_factors else ''}"
    if (out / "pt" / "manifest.json").exists() and (out / "ft" / "manifest.json").exists():
        return out
    dtype = getattr(torch, args.dtype)
    pt = _model(args.shape, 0, dtype, args.device)
    specs = discover_modules(pt)
    t0 = time.perf_counter()
    if args.synthetic_factors:
        for name, seed in (("pt", 11), ("ft", 12)):
            synthetic_factors(specs, seed).save(out / name)
        print(f"wrote synthetic factors of both stages in {time.perf_counter() - t0:.0f}s", flush=True)
        return out
    ft = _perturbed(pt)
    for name, model, seed in (("pt", pt, 11), ("ft", ft, 12)):
        docs = _docs(args.fit_docs, args.doc_length, seed)
        fit_ekfac(model, specs, docs, FitSettings(batch_size=4, cache_mib=2048), 0).save(out / name)
    print(f"fitted both stages' factors on {args.fit_docs} documents in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def one(args) -> dict:
    """One configuration in this process: the rows' numbers."""
    from msif_core.api import AttributionSettings, gradient_tables
    from msif_core.checkpoints import LoadedModel
    from msif_core.data import iter_batches
    from msif_core.ekfac import Factors
    from msif_core.gradients import analysed_grads_only, forward_backward
    from msif_core.memory import retain_freed_memory
    from msif_core.models import discover_modules
    from msif_core.stages import Stage

    retain_freed_memory()
    dtype = getattr(torch, args.dtype)
    pt = _model(args.shape, 0, dtype, args.device)
    ft = _perturbed(pt)
    specs = discover_modules(pt)
    out = Path(args.factors)
    cast = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    ptf, ftf = (Factors.load(out / s, device=args.device, dtype=None if args.factors_float64 else cast,
                             lazy=not args.eager_factors) for s in ("pt", "ft"))
    docs, queries = _docs(args.docs, args.doc_length, 21), _queries(args.n_queries, args.query_length, 22)
    stage = lambda m: Stage(LoadedModel(m, None, "", "causal_lm"), specs)  # noqa: E731
    settings = AttributionSettings(methods=tuple(args.methods.split(",")), query_rank=args.rank,
                                   memory_gib=args.memory_gib, batch_size=args.batch_size)
    t0 = time.perf_counter()
    stats: dict = {}
    tables = gradient_tables(stage(pt), stage(ft), queries, [f"q{i}" for i in range(len(queries))], docs,
                             [f"d{i}" for i in range(len(docs))], settings, ptf, ftf, stats=stats)
    total_s = time.perf_counter() - t0
    rows = sum(len(t) for t in tables.values())
    plan = stats["plan"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # then one plain forward+backward over the documents in the plan's batches, for the ratio
    t0 = time.perf_counter()
    with analysed_grads_only(pt, specs):
        for batch in iter_batches(docs, plan["batch_size"], 0):
            forward_backward(pt, specs, batch.to(args.device), fisher="empirical")
    plain_s = time.perf_counter() - t0
    return {"shape": args.shape, "dtype": args.dtype, "device": args.device, "queries": len(queries),
            "rank": args.rank, "docs": len(docs), "doc_length": args.doc_length, "query_length": args.query_length,
            "methods": args.methods, "memory_gib": args.memory_gib, "plan": plan,
            "factors_read": "eager" if args.eager_factors else "lazy",
            "factors": "synthetic" if args.synthetic_factors else "fitted",
            "factors_dtype": "float64" if args.factors_float64 else str(cast).replace("torch.", ""),
            "analysed_parameters": sum(s.out_features * s.d for s in specs), "peak_rss_gib": round(peak / 2**30, 3),
            "peak_after_query_side_gib": round(stats["query_peak_rss"] / 2**30, 3),
            "models_gib": round(2 * sum(p.numel() * p.element_size() for p in pt.parameters()) / 2**30, 3),
            "factors_gib": round(sum(f.n_floats() for f in (ptf, ftf)) * (8 if args.factors_float64 else 4) / 2**30, 3),
            "ihvp_gib": round(plan["queries_per_chunk"] * plan["bytes_per_query"] / 2**30, 3),
            "seconds": round(total_s, 1), "query_side_s": round(stats["query_s"], 1),
            "scoring_s": round(stats["score_s"], 1), "plain_pass_s": round(plain_s, 2), "rows": rows,
            "candidate_passes": stats["passes"],
            "scoring_pass_vs_plain": round(stats["score_s"] / stats["passes"] / plain_s, 2)}


def main() -> None:
    """Every configuration, each in its own process; print and append the rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="pythia-160m", choices=sorted(SHAPES))
    ap.add_argument("--queries", default="25,100,200")
    ap.add_argument("--ranks", default="0,32")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--doc-length", type=int, default=256)
    ap.add_argument("--query-length", type=int, default=32)
    ap.add_argument("--fit-docs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--memory-gib", type=float, default=8.0)
    ap.add_argument("--methods", default="ms_if")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--factors-float64", action="store_true", help="keep the factors in float64 as stored")
    ap.add_argument("--eager-factors", action="store_true",
                    help="read both stages' factors into memory at once (default: module by module)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.jsonl"))
    ap.add_argument("--prepare-only", action="store_true", help="fit and save the factors, run nothing else")
    ap.add_argument("--synthetic-factors", action="store_true",
                    help="factors of the right shapes, random values, not fitted (see synthetic_factors)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--n-queries", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--factors", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    factors = prepare(args)
    if args.prepare_only:
        return
    for rank in (int(r) for r in args.ranks.split(",")):
        for q in (int(x) for x in args.queries.split(",")):
            cmd = [sys.executable, __file__, "--one", "--rank", str(rank), "--n-queries", str(q),
                   "--factors", str(factors)] + [a for a in sys.argv[1:]]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"rank {rank}, {q} queries: failed\n{r.stderr[-2000:]}", flush=True)
                continue
            emit(json.loads(r.stdout.strip().splitlines()[-1]), args.out)


if __name__ == "__main__":
    main()
