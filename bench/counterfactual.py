"""Counterfactual test on the demo world: remove each method's top-k documents, retrain, and see whether
the fine-tuned model's answers depended on them (issue 13, item 1).

Run:  .venv/bin/python bench/counterfactual.py [--world lakehouse/demo] [--groups 2] [--group-size 25]
          [--k 3 10] [--methods ms_if ss_if gdp repsim bm25 retriever] [--seed 0]
          [--out bench/results/counterfactual.jsonl] [--md bench/results/counterfactual.md]

The world must be built and attributed first (``make demo``: its tables under ``<world>/tables`` score every
document for every test query). Groups of test queries with distinct facts are drawn with ``--seed``
(``msif_demo.counterfactual.choose_groups``); for each group, method and k the union of the group's top-k
documents by that method is removed from the pre-training corpus, both stages are retrained from the build's
initialisation with its seeds and schedule (``retrain``: a true retrain, not a tail-patch), and each query of
the group is measured on the new fine-tuned model. Besides the methods: ``random`` (k random documents per
query) and ``true_sources`` (every true source of the group's facts: the oracle that removes the facts).
The reference is the retrain with nothing removed (it also reports whether that reproduces the shipped
checkpoint exactly).

Rows (one per retrain, appended as each finishes, so an interrupted run resumes where it stopped:
a (group, method, k) already in ``--out`` for the same world and groups is not retrained): ``group``,
``method``, ``k``, ``removed`` (documents), ``true_removed`` (of them true sources of the group's queries),
``pretrain_s``, ``finetune_s``, and per query ``query_id``, ``nll``, ``correct``. The summary (``--md``) gives
per method and k the mean increase of −log p(answer) and the drop of answer accuracy over all groups'
queries, each with a 95% bootstrap interval over queries (``--boot`` resamples).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from msif_demo.counterfactual import (  # noqa: E402
    CounterfactualError,
    DemoWorld,
    check_groups,
    choose_groups,
    measure,
    removal_sets,
    retrain,
    same_weights,
)

log = logging.getLogger("counterfactual")


def rankings(world: Path, methods: list[str], query_ids: list[str], k: int) -> dict[str, dict[str, list[str]]]:
    """Each method's top-``k`` documents of each query, best first, from the world's influence_scores tables."""
    import duckdb

    files = sorted((world / "tables" / "influence_scores").glob("*.parquet"))
    if not files:
        raise CounterfactualError(f"{world / 'tables' / 'influence_scores'}: no score tables; run make demo first")
    con = duckdb.connect()
    con.register("q", pd.DataFrame({"query_id": query_ids}))
    con.register("m", pd.DataFrame({"method": methods}))
    df = con.execute(f"""
        SELECT method, query_id, doc_id FROM (
          SELECT method, query_id, doc_id, row_number() OVER (PARTITION BY method, query_id
                                                             ORDER BY score DESC, doc_id) AS r
          FROM read_parquet({[str(f) for f in files]}) WHERE query_id IN (SELECT query_id FROM q)
            AND method IN (SELECT method FROM m))
        WHERE r <= {int(k)} ORDER BY method, query_id, r""").df()
    missing = sorted(set(methods) - set(df.method))
    if missing:
        raise CounterfactualError(f"the score tables have no rows of method(s) {missing}; add them to [scores] "
                                  f"methods and rerun msif")
    return {m: {q: g.doc_id.tolist() for q, g in d.groupby("query_id")} for m, d in df.groupby("method")}


def bootstrap(values: np.ndarray, n: int, seed: int) -> tuple[float, float, float]:
    """Mean and 95% percentile bootstrap interval."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(rows: list[dict], base: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Per (method, k): mean Δ(−log p) and accuracy drop over the queries of every group, with intervals."""
    ref = base.set_index("query_id")
    out = []
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] != "baseline":
            keyed.setdefault((r["method"], r["k"]), []).append(r)
    for (method, k), rs in keyed.items():
        d_nll, d_acc = [], []
        for r in rs:
            for q in r["queries"]:
                d_nll.append(q["nll"] - ref.loc[q["query_id"], "nll"])
                d_acc.append(float(ref.loc[q["query_id"], "correct"]) - float(q["correct"]))
        m, lo, hi = bootstrap(np.array(d_nll), n_boot, seed)
        a, alo, ahi = bootstrap(np.array(d_acc), n_boot, seed)
        out.append({"method": method, "k": k, "queries": len(d_nll),
                    "removed_mean": float(np.mean([len(r["removed"]) for r in rs])),
                    "true_removed_mean": float(np.mean([r["true_removed"] for r in rs])),
                    "delta_nll": m, "delta_nll_lo": lo, "delta_nll_hi": hi,
                    "accuracy_drop": a, "accuracy_drop_lo": alo, "accuracy_drop_hi": ahi})
    return pd.DataFrame(out).sort_values(["k", "delta_nll"], ascending=[True, False], na_position="last")


def markdown(summary: pd.DataFrame, meta: dict) -> str:
    lines = [f"Counterfactual test on the {meta.get('world', 'demo')} world ({meta['groups']} groups x "
             f"{meta['group_size']} queries, "
             f"seed {meta['seed']}; reference: retrain with nothing removed, "
             f"{'identical to' if meta['reproduces_checkpoint'] else 'NOT identical to'} the shipped checkpoint; "
             f"one retrain {meta['retrain_s']:.0f} s)", "",
             "| k | method | documents removed per group | true sources among them | Δ −log p(answer) [95% CI] | "
             "accuracy drop [95% CI] |", "|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        k = "all" if r.k is None or (isinstance(r.k, float) and np.isnan(r.k)) else int(r.k)
        lines.append(f"| {k} | {r.method} | {r.removed_mean:.0f} | {r.true_removed_mean:.0f} | "
                     f"{r.delta_nll:+.3f} [{r.delta_nll_lo:+.3f}, {r.delta_nll_hi:+.3f}] | "
                     f"{r.accuracy_drop:+.3f} [{r.accuracy_drop_lo:+.3f}, {r.accuracy_drop_hi:+.3f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default=str(ROOT / "lakehouse" / "demo"))
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=25)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--methods", nargs="+", default=["ms_if", "ss_if", "gdp", "repsim", "bm25", "retriever"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "counterfactual.jsonl"))
    ap.add_argument("--md", default=str(ROOT / "bench" / "results" / "counterfactual.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("msif_core", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)

    world_dir = Path(args.world).resolve()
    world = DemoWorld.load(world_dir)
    groups = choose_groups(world.queries, args.groups, args.group_size, args.seed)
    check_groups(world.queries, groups, args.k, len(world.corpus))  # every configuration error before training
    qids = [q for g in groups for q in g]
    ranks = rankings(world_dir, args.methods, qids, max(args.k))
    plan = removal_sets(ranks, groups, args.k, world.queries, world.corpus.doc_id.tolist(), args.seed)
    key = {"world": str(world_dir), "groups": groups, "seed": args.seed}
    out = Path(args.out)
    done = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
    done = [r for r in done if r.get("key") == key]
    have = {(r["group"], r["method"], r["k"]) for r in done}
    log.info("%d groups x %d queries; %d retrains planned (+ the reference), %d already done", len(groups),
             args.group_size, len(plan), len(have & {(p["group"], p["method"], p["k"]) for p in plan}))

    def record(row: dict) -> None:
        row = {"key": key, **row, "time": time.strftime("%Y-%m-%d %H:%M")}
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done.append(row)

    true_by_q = world.queries.set_index("query_id").true_doc_ids
    if (-1, "baseline", None) not in have:
        from transformers import AutoModelForCausalLM

        pre, ft, t = retrain(world)
        shipped = AutoModelForCausalLM.from_pretrained(world_dir / "models" / "pretrained")
        m = measure(ft, world, qids)
        record({"group": -1, "method": "baseline", "k": None, "removed": [], "true_removed": 0, **t,
                "reproduces_checkpoint": same_weights(pre, shipped),
                "queries": m[["query_id", "nll", "correct"]].to_dict("records")})
        log.info("reference retrain: %.0f s, reproduces the shipped checkpoint: %s", t["pretrain_s"] + t["finetune_s"],
                 done[-1]["reproduces_checkpoint"])
    base_nll = {q["query_id"]: q["nll"] for q in next(r for r in done if r["method"] == "baseline")["queries"]}
    for i, p in enumerate(plan):
        if (p["group"], p["method"], p["k"]) in have:
            continue
        group = groups[p["group"]]
        true = {d for q in group for d in true_by_q[q]}
        t0 = time.perf_counter()
        _, ft, t = retrain(world, p["removed"])
        m = measure(ft, world, group)
        record({**p, "true_removed": len(true & set(p["removed"])), **t,
                "queries": m[["query_id", "nll", "correct"]].to_dict("records")})
        log.info("%d/%d group %d %s k=%s: %d removed (%d true), Δnll %+.3f, %.0f s", i + 1, len(plan), p["group"],
                 p["method"], p["k"], len(p["removed"]), done[-1]["true_removed"],
                 m.nll.mean() - np.mean([base_nll[q] for q in group]),
                 time.perf_counter() - t0)
    base_row = next(r for r in done if r["method"] == "baseline")
    base = pd.DataFrame(base_row["queries"])
    summary = summarise(done, base, args.boot, args.seed)
    meta = {"world": world.params.size, "groups": len(groups), "group_size": args.group_size, "seed": args.seed,
            "reproduces_checkpoint": base_row["reproduces_checkpoint"],
            "retrain_s": float(np.median([r["pretrain_s"] + r["finetune_s"] for r in done]))}
    text = markdown(summary, meta)
    Path(args.md).write_text(text)
    print(text)


if __name__ == "__main__":
    try:
        main()
    except CounterfactualError as e:
        raise SystemExit(f"counterfactual: {e}") from None
