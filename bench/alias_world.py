"""Fact tracing where word overlap fails (issue 13, item 4): the demo world with every fact stated under an
alias, through the pipeline, beside the plain demo world.

Run:  .venv/bin/python bench/alias_world.py [--worlds alias demo] [--root lakehouse]
          [--finetune-epochs N --finetune-lr LR [--accuracy-only]] [--candidates K [--methods ...]]
          [--out bench/results/alias_world.jsonl] [--md bench/results/alias_world.md]

The ``alias`` world (``msif_demo.DemoParams(size="alias")``: ``WorldParams(alias_share=1.0)``) is the demo
world drawn with the same seed, except that every entity's facts are stated under an invented alias
("Mifa Ganbo was born in Dunmoor.") and each link "<name> is also known as <alias>." is stated in three
documents of its own (750 in all). Questions and fine-tuning pairs keep the real name, so a question
("Where was Sulval Lin born?" + the answer) shares no rare word with the documents that state its answer:
the name occurs only in the link documents, the answer word in every document about anyone born there.
The fine-tuning pairs teach the model to answer about a name from facts stated about its alias.

For each world: build it under ``<root>/demo`` or ``<root>/demo_alias`` (skipped when built), write its
experiment file (``dagster_project/demo.toml`` rooted there: every document scored, damping 1e-4), run
``msif run`` on it, and read ``attribution_quality`` (MRR, Recall@10 per method against the true sources)
and the build's answer accuracies. For the alias world also: how often each method ranks a link document
first, and the MRR of the link documents (what retrieval finds instead). One row per world is appended to
``--out``; ``--md`` holds the latest row of every configuration there.

``--finetune-epochs`` / ``--finetune-lr`` build a variant with another fine-tuning schedule (in
``<folder>_ft<N>``); ``--accuracy-only`` records only its answer accuracies (no pipeline run).
``--candidates K`` attributes the world as the pipeline's default does (the K nearest sentence embeddings per
query and shard, reranked) with ``--methods`` (default: the six, ``ms_if_cosine`` and the mixed ``ms_if_rrf``),
in ``<world>/candidates_<K>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msif_core.metrics import reciprocal_ranks  # noqa: E402
from msif_demo import DemoParams, build_demo  # noqa: E402

log = logging.getLogger("alias_world")
FOLDERS = {"demo": "demo", "alias": "demo_alias"}


def params(size: str, epochs: int | None, lr: float | None, seed: int | None = None) -> DemoParams:
    """The build parameters of world ``size``, with another fine-tuning schedule and another world seed (names,
    facts, templates, documents; the training schedules and their seeds unchanged) where given."""
    p = DemoParams(size=size)
    assert p.finetune is not None and p.world is not None
    ft = dataclasses.replace(p.finetune, epochs=epochs or p.finetune.epochs, lr=lr or p.finetune.lr)
    world = p.world if seed is None else dataclasses.replace(p.world, seed=seed)
    return DemoParams(size=size, finetune=ft, world=world)


def ensure(root: Path, p: DemoParams, attribute: bool = True) -> Path:
    """The world of ``p`` built (and, with ``attribute``, attributed: the pipeline run is a no-op when up to
    date) under ``root``."""
    build_demo(root, p)
    if not attribute:
        return root
    toml = root / "experiment.toml"
    shutil.copy(ROOT / "dagster_project" / "demo.toml", toml)
    subprocess.run([str(ROOT / ".venv" / "bin" / "msif"), "run", str(toml)], check=True, cwd=ROOT)
    return root


def attribute_variant(world: Path, candidates: int, methods: list[str]) -> Path:
    """The world attributed with ``candidates`` nearest embeddings per query and shard and ``methods``, in a
    lakehouse of its own (``<world>/candidates_<k>``, the models and data read from the world)."""
    root = world / f"candidates_{candidates}"
    root.mkdir(exist_ok=True)
    text = (ROOT / "dagster_project" / "demo.toml").read_text()
    for key in ("models/", "data/"):
        text = text.replace(f'"{key}', f'"../{key}')
    text = text.replace('candidates = "all"', f"candidates = {candidates}")
    text = re.sub(r"^methods = .*$", f"methods = {json.dumps(methods)}", text, count=1, flags=re.MULTILINE)
    (root / "experiment.toml").write_text(text)
    msif = str(ROOT / ".venv" / "bin" / "msif")
    subprocess.run([msif, "run", str(root / "experiment.toml")], check=True, cwd=ROOT)
    return root


def scores_of(root: Path) -> pd.DataFrame:
    """Every (method, query, document) score of the world's influence_scores tables."""
    files = sorted((root / "tables" / "influence_scores").glob("*.parquet"))
    return duckdb.sql(f"select method, query_id, doc_id, score from read_parquet({[str(f) for f in files]})").df()


def link_stats(root: Path, queries: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per method: the share of queries whose top document is a link document, and the MRR of the links."""
    scores = scores_of(root)
    out: dict[str, dict[str, float]] = {}
    links = queries.set_index("query_id").link_doc_ids
    for method, rows in scores.groupby("method"):
        wide = rows.pivot(index="doc_id", columns="query_id", values="score")
        qids = [q for q in wide.columns if q in links.index and isinstance(links[q], list)]  # aliased queries
        if not qids:
            continue
        mat = wide[qids].to_numpy()
        top = wide.index.to_numpy()[np.nanargmax(np.nan_to_num(mat, nan=-np.inf), axis=0)]
        out[str(method)] = {
            "top1_is_link": float(np.mean([t in set(links[q]) for t, q in zip(top, qids, strict=True)])),
            "link_mrr": float(np.mean(reciprocal_ranks(np.nan_to_num(mat, nan=-np.inf), wide.index.tolist(),
                                                       [links[q] for q in qids]))),
        }
    return out


def rrf_sweep(lake: Path, queries: pd.DataFrame, ks=(1, 10, 30, 60, 200), weights=(0.5, 1, 2, 3)) -> list[dict]:
    """MRR and Recall@10 of the fusion w / (k + retriever rank) + 1 / (k + MS-IF rank) for each k and retriever
    weight w, from the stored rows of ``lake`` (ranks per query over its candidates; ties by doc_id). w = 1 is
    ms_if_rrf (k = [scores] rrf_k). Reading k or w off this table on a world is choosing on its ground truth:
    ms_if_rrf's default k = 1 was read off the world of seed 1 (``--world-seed 1``) by a rule fixed before (the
    highest mean of MRR and Recall@10), then measured on the demo world of seed 0."""
    from msif_core.methods import rrf_scores
    from msif_core.metrics import evaluate_rankings

    s = scores_of(lake)
    wide = s[s.method.isin(["ms_if", "retriever"])].pivot_table(index="doc_id", columns=["method", "query_id"],
                                                                  values="score")
    qids = [q for q in queries.query_id if q in wide["ms_if"].columns]
    ms, ret = wide["ms_if"][qids].to_numpy(), wide["retriever"][qids].to_numpy()
    truth = queries.set_index("query_id").loc[qids].true_doc_ids.tolist()
    out = []
    for k in ks:
        for w in weights:
            fused = np.nan_to_num(rrf_scores(ret, ms, k=k, weights=(w, 1.0)), nan=-np.inf)  # not a candidate: last
            t = evaluate_rankings({"fused": fused}, wide.index.tolist(), truth, query_ids=qids)
            out.append({"k": k, "retriever_weight": w, "mrr": float(t.mrr.iloc[0]),
                        "recall_at_10": float(t.recall_at_10.iloc[0])})
    return out


def row(world: str, root: Path, attributed: Path | None) -> dict:
    """The row of one world (built under ``root``, its tables in the lakehouse ``attributed``): sizes, schedule,
    accuracies, attribution quality per method (and link statistics)."""
    report = json.loads((root / "demo_report.json").read_text())
    r = {"world": world, "world_seed": report["params"]["world"]["seed"], "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "documents": report["world"]["n_documents"],
         "queries": report["world"]["n_queries"], "finetune": {k: report["params"]["finetune"][k]
                                                               for k in ("epochs", "lr")},
         "accuracy": report["accuracy"]}
    if attributed is None:
        return r
    toml = (attributed / "experiment.toml").read_text()
    r["candidates"] = next(x.split("=")[1].split("#")[0].strip() for x in toml.splitlines()
                           if x.startswith("candidates"))
    quality = pd.read_parquet(attributed / "tables" / "attribution_quality.parquet")
    queries = pd.read_json(root / "data" / "queries.jsonl", lines=True)
    r["quality"] = quality.to_dict(orient="records")
    if "link_doc_ids" in queries:
        r["links"] = link_stats(attributed, queries)
    if attributed != root:  # a rerank of candidates: how the fusion depends on its constants
        r["rrf_sweep"] = rrf_sweep(attributed, queries)
    return r


def markdown(rows: list[dict]) -> str:
    """MRR and Recall@10 per method and world, the accuracies, and the link statistics."""
    parts = []
    for r in rows:
        acc, ft = r["accuracy"], r["finetune"]
        cand = f"; candidates {r['candidates']}" if "candidates" in r else ""
        seed = f", world seed {r['world_seed']}" if r.get("world_seed") else ""
        text = (f"### {r['world']} world{seed} ({r['documents']} documents, {r['queries']} queries; fine-tuning "
                f"{ft['epochs']} epochs at lr {ft['lr']:g}{cand})\n\n"
                f"answer accuracy: fine-tuned {acc['finetuned_test_qa']:.3f} on the test queries, "
                f"{acc['finetuned_train_qa']:.3f} on the fine-tuning pairs; pre-trained cloze "
                f"{acc['pretrained_test_cloze']:.3f}")
        if "quality" in r:
            t = pd.DataFrame(r["quality"])[["method", "mrr", "recall_at_k"]]
            t = t.rename(columns={"recall_at_k": "recall@10"})
            if "links" in r:
                for stat in ("top1_is_link", "link_mrr"):
                    t[stat] = t.method.map({m: v[stat] for m, v in r["links"].items()})
            text += "\n\n" + t.to_markdown(index=False, floatfmt=".3f")
        if "rrf_sweep" in r:
            sweep = pd.DataFrame(r["rrf_sweep"])
            text += ("\n\nFusion w / (k + retriever rank) + 1 / (k + MS-IF rank) (ms_if_rrf: w = 1, k = its "
                     "rrf_k), MRR / Recall@10 (on this world's ground truth):\n\n"
                     + sweep.pivot(index="k", columns="retriever_weight", values="mrr").round(3).astype(str)
                     .add(" / ").add(sweep.pivot(index="k", columns="retriever_weight", values="recall_at_10")
                                     .round(3).astype(str)).to_markdown())
        parts.append(text)
    return "\n\n".join(parts) + "\n"


def main() -> None:
    """Build, attribute and evaluate the worlds; append their rows and write the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", nargs="+", default=["alias", "demo"], choices=sorted(FOLDERS))
    ap.add_argument("--root", default=str(ROOT / "lakehouse"), help="the worlds are built in <root>/demo[_alias]")
    ap.add_argument("--finetune-epochs", type=int, help="another fine-tuning schedule: epochs")
    ap.add_argument("--finetune-lr", type=float, help="another fine-tuning schedule: peak learning rate")
    ap.add_argument("--world-seed", type=int, help="draw the world with this seed (in <folder>_seed<N>): a world "
                    "the fusion constants were not read off")
    ap.add_argument("--accuracy-only", action="store_true", help="build and record accuracies; no pipeline run")
    ap.add_argument("--candidates", type=int, help="attribute with this many nearest embeddings per query and "
                    "shard (in <world>/candidates_<k>) instead of every document")
    ap.add_argument("--methods", nargs="+", default=["ms_if", "ss_if", "gdp", "repsim", "bm25", "retriever",
                                                     "ms_if_cosine", "ms_if_rrf"], help="with --candidates")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "alias_world.jsonl"))
    ap.add_argument("--md", default=str(ROOT / "bench" / "results" / "alias_world.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = []
    for world in args.worlds:
        folder = (FOLDERS[world] + (f"_ft{args.finetune_epochs}" if args.finetune_epochs else "")
                  + (f"_seed{args.world_seed}" if args.world_seed is not None else ""))
        p = params(world, args.finetune_epochs, args.finetune_lr, args.world_seed)
        root = ensure(Path(args.root) / folder, p, attribute=not args.accuracy_only and not args.candidates)
        lake = None if args.accuracy_only else root
        if args.candidates and not args.accuracy_only:
            lake = attribute_variant(root, args.candidates, args.methods)
        rows.append(row(world, root, lake))
        with open(args.out, "a") as fh:
            fh.write(json.dumps(rows[-1]) + "\n")
    every = [json.loads(x) for x in Path(args.out).read_text().splitlines() if x.strip()]
    latest = {(r["world"], r.get("world_seed", 0), r.get("candidates"), r["finetune"]["epochs"],
               r["finetune"]["lr"]): r for r in every}
    Path(args.md).write_text(markdown(list(latest.values())))  # the latest row of every configuration
    print(markdown(rows))


if __name__ == "__main__":
    main()
