"""Fact tracing on the demo world (paper section 5.3): which method finds the documents a fact came from?

Run:  .venv/bin/python bench/fact_tracing.py [--world DIR] [--queries N] [--size demo|large]

Every document is scored for every test query by MS-IF and SS-IF over a damping sweep (absolute
1e-8 … 1e-2 and relative 0.1 × mean Λ), GDP, RepSim and word-level BM25. Because EK-FAC is
block-diagonal, the MLP-only variant of each influence method is the MLP part of the same scores.
All (method, damping) query iHVPs are stacked into one scoring pass per model. Outputs under
bench/out/: fact_tracing.json, fact_tracing.md (tables) and fact_tracing.png (MRR and Recall@10
against damping, like the paper's figure 3).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msif_core.api import AttributionSettings, encode_queries, fit_stage_factors, load_stages  # noqa: E402
from msif_core.baselines import bm25_scores, repsim_scores  # noqa: E402
from msif_core.data import encode_documents  # noqa: E402
from msif_core.metrics import evaluate_rankings, reranking_candidates  # noqa: E402
from msif_core.query import QueryIHVPs, measurement_gradients, query_ihvps  # noqa: E402
from msif_core.scoring import score_documents  # noqa: E402

log = logging.getLogger("fact_tracing")
DAMPINGS: list[float | str] = [1e-8, 1e-6, 1e-4, 1e-3, 1e-2, "relative:0.1"]


def stack(parts: list[QueryIHVPs]) -> QueryIHVPs:
    """One QueryIHVPs holding the queries of all ``parts`` one after another."""
    first = parts[0]
    dense = {n: torch.cat([p.matrix(n) for p in parts]) for n in first.specs}
    return QueryIHVPs(first.method, dict(first.specs), dense)


def ensure_world(world: Path) -> Path:
    """``world``, after building the demo world there if it is not built yet."""
    if not (world / "models" / "finetuned").exists():
        from msif_demo import build_demo

        build_demo(world)
    return world


def load_world(world: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The demo world's corpus, fine-tuning pairs and queries."""
    corpus = pd.read_parquet(world / "data" / "corpus.parquet")
    finetune = pd.read_json(world / "data" / "finetune.jsonl", lines=True)
    queries = pd.read_json(world / "data" / "queries.jsonl", lines=True)
    return corpus, finetune, queries


def run(world: Path, n_queries: int, out_dir: Path, seed: int = 0) -> dict:
    """Score, evaluate, plot; returns the results dict."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    corpus, finetune, queries = load_world(world)
    queries = queries.head(n_queries)
    settings = AttributionSettings(max_length=128, batch_size=16, seed=seed)
    pt, ft = load_stages(world / "models" / "pretrained", world / "models" / "finetuned", settings)
    docs = encode_documents(pt.loaded.tokenizer, corpus.text.tolist(), settings.max_length)
    doc_ids = corpus.doc_id.iloc[docs.kept].tolist()
    qenc = encode_queries(ft, queries.prompt.tolist(), queries.completion.tolist(), settings.max_length)
    fenc = encode_queries(ft, finetune.prompt.tolist(), finetune.completion.tolist(), settings.max_length)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    pt_f = fit_stage_factors(pt, docs, settings)
    timings["fit_pretrain"] = time.perf_counter() - t
    t = time.perf_counter()
    ft_f = fit_stage_factors(ft, fenc, settings)
    timings["fit_finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    grads = measurement_gradients(ft.model, ft.specs, qenc, settings.batch_size, ft.pad_id)
    ms = [query_ihvps(grads, ft.specs, "ms_if", ft_f, pt_f, d, d) for d in DAMPINGS]
    ss = [query_ihvps(grads, ft.specs, "ss_if", ft_f, None, d) for d in DAMPINGS]
    gdp = query_ihvps(grads, ft.specs, "gdp")
    timings["query_ihvps"] = time.perf_counter() - t

    nq = len(qenc)
    t = time.perf_counter()
    res_pt = score_documents(pt.model, stack(ms + [gdp]), docs, settings.batch_size, pt.pad_id)
    res_ft = score_documents(ft.model, stack(ss), docs, settings.batch_size, ft.pad_id)
    timings["score"] = time.perf_counter() - t

    def cols(res, i: int, part: str | None) -> np.ndarray:
        m = res.scores if part is None else res.part(part)
        return m[:, i * nq:(i + 1) * nq]

    scores: dict[str, np.ndarray] = {}
    for i, d in enumerate(DAMPINGS):
        scores[f"ms_if@{d}"] = cols(res_pt, i, None)
        scores[f"ms_if_mlp@{d}"] = cols(res_pt, i, "mlp")
        scores[f"ss_if@{d}"] = cols(res_ft, i, None)
        scores[f"ss_if_mlp@{d}"] = cols(res_ft, i, "mlp")
    scores["gdp"] = cols(res_pt, len(DAMPINGS), None)
    scores["gdp_mlp"] = cols(res_pt, len(DAMPINGS), "mlp")
    t = time.perf_counter()
    scores["repsim"] = repsim_scores(ft.model, pt.model, pt.loaded.tokenizer, docs, qenc)
    timings["repsim"] = time.perf_counter() - t
    t = time.perf_counter()
    doc_texts = corpus.text.iloc[docs.kept].tolist()
    q_texts = [p + c for p, c in zip(queries.prompt.iloc[qenc.kept], queries.completion.iloc[qenc.kept])]
    scores["bm25"] = bm25_scores(doc_texts, q_texts)
    timings["bm25"] = time.perf_counter() - t
    rng = np.random.default_rng(seed)
    scores["random"] = rng.standard_normal(scores["bm25"].shape)

    qsel = queries.iloc[qenc.kept]
    true_ids = qsel.true_doc_ids.tolist()
    qinfo = pd.DataFrame({"answer": qsel.completion.str.strip(), "true_doc_ids": true_ids})
    cands = reranking_candidates(doc_ids, doc_texts, qinfo, scores["bm25"], rng)
    table = evaluate_rankings(scores, doc_ids, true_ids, candidates=cands, query_ids=qsel.query_id.tolist())
    out_dir.mkdir(parents=True, exist_ok=True)
    share = {"ms_if@1e-06": float(np.abs(res_pt.part("mlp")[:, nq:2 * nq]).sum()
                                   / np.abs(res_pt.by_block[:, :, nq:2 * nq]).sum())}
    result = {"world": str(world), "documents": len(doc_ids), "queries": nq, "timings_s": timings,
              "mlp_share_of_abs_influence": share, "table": table.to_dict(orient="records")}
    (out_dir / "fact_tracing.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "fact_tracing.md").write_text(table.to_markdown(index=False, floatfmt=".3f"))
    plot(table, out_dir / "fact_tracing.png")
    return result


def plot(table: pd.DataFrame, path: Path) -> None:
    """MRR and Recall@10 against damping per influence method; flat lines for the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    absolute = [d for d in DAMPINGS if not isinstance(d, str)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "mrr", "MRR"), (axes[1], "recall_at_10", "Recall@10")):
        for name, style in (("ms_if", "-o"), ("ms_if_mlp", "--o"), ("ss_if", "-s"), ("ss_if_mlp", "--s")):
            ys = [float(table.loc[table.method == f"{name}@{d}", metric].iloc[0]) for d in absolute]
            ax.plot(absolute, ys, style, label=name.replace("_", "-").upper().replace("-MLP", " (MLP)"))
        for name, color in (("gdp", "grey"), ("repsim", "tab:purple"), ("bm25", "black"), ("random", "tab:red")):
            y = float(table.loc[table.method == name, metric].iloc[0])
            ax.axhline(y, color=color, linestyle=":", label=name.upper())
        ax.set_xscale("log")
        ax.set_xlabel("damping λ (absolute, both stages)")
        ax.set_title(f"{title}, every document scored")
        ax.set_ylim(0, 1.02)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Build (or reuse) the demo world, then run the fact-tracing evaluation."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="lakehouse/demo", help="a built demo world (built if missing)")
    ap.add_argument("--queries", type=int, default=1000, help="at most this many test queries")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    world = ensure_world(Path(args.world))
    r = run(world, args.queries, Path(args.out))
    print(Path(args.out, "fact_tracing.md").read_text())
    print(json.dumps({k: r[k] for k in ("documents", "queries", "timings_s", "mlp_share_of_abs_influence")},
                     indent=2))


if __name__ == "__main__":
    main()
