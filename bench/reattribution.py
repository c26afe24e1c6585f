"""Re-attribution after a new fine-tuned checkpoint, with and without the influence index (issue 12).

Run:  .venv/bin/python bench/reattribution.py [--world lakehouse/demo] [--dimensions 65536] [--rerank 100]
          [--variants retriever,index_rerank,index_only] [--copies 1]

For each variant an experiment over the demo world's data and models (the world itself is not rebuilt;
its fine-tuned checkpoint is copied so that the demo is never touched) runs ``msif run`` twice in a fresh
lakehouse under bench/out/reattribution/: once from nothing, then after the fine-tuned checkpoint was
replaced by a perturbed copy (a "new fine-tune": Gaussian noise of 1% of each weight tensor's standard
deviation). Variants:

- ``retriever``: today's default, the 100 nearest documents per query and shard by embedding (methods
  ms_if, its normalised variants ms_if_cosine and ms_if_unit, bm25, retriever);
- ``index_rerank``: ``[index] dimensions``, ``candidates = "index"``: each query's top ``--rerank`` per shard by
  the influence index, rescored exactly by ms_if and ms_if_cosine (and bm25, retriever), plus ``ms_if_index``;
- ``index_only``: the index alone (``ms_if_index``; bm25 and retriever beside it, no exact gradient method).

``--copies N`` scores a corpus of N copies of the demo corpus (copy i's doc_ids end in ``~i``; the true
sources stay those of copy 0; identical copies tie, so quality is not comparable across N), in N times as
many shards: what the fixed costs of a run (process start,
imports, the input checks, Dagster's runs) weigh against a larger corpus.

Per run: wall seconds of ``msif run``, the assets it materialised (units), the exact ms_if pairs scored, and
the MRR / Recall@10 of every method (attribution_quality). Rows to bench/results/reattribution.jsonl.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from rows import emit  # noqa: E402

VARIANTS = {
    "retriever": ('["ms_if", "ms_if_cosine", "ms_if_unit", "bm25", "retriever"]', "100", ""),
    "index_rerank": ('["ms_if", "ms_if_cosine", "bm25", "retriever"]', '"index"',
                     "[index]\ndimensions = {k}\nrerank = {r}\n"),
    "index_only": ('["bm25", "retriever"]', "100", "[index]\ndimensions = {k}\n"),
}


def perturb(ckpt: Path, seed: int) -> None:
    """Add Gaussian noise (1% of each tensor's std) to the safetensors weights in ``ckpt``, in place."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    for f in ckpt.glob("*.safetensors"):
        w = load_file(f)
        out = {k: (v + 0.01 * v.float().std().nan_to_num() * torch.randn(v.shape, generator=g)).to(v.dtype)
               if v.is_floating_point() and v.numel() > 1 else v for k, v in w.items()}
        save_file(out, f, metadata={"format": "pt"})


def run(toml: Path) -> tuple[float, list[str], dict[str, float]]:
    """``msif run toml``: wall seconds, the materialised (asset [partition]) units from its ok lines, and the
    seconds each asset's steps took (summed over partitions, as the ok lines report them)."""
    t0 = time.perf_counter()
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "msif"), "run", str(toml)], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"msif run {toml} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    units, step_s = [], {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s+ok\s+(.*?)(?: \[(.*?)\])? \((\d+\.\d+)s\)$", line)
        if m:
            units += [f"{a}[{m.group(2)}]" if m.group(2) else a for a in m.group(1).split(", ")]
            key = m.group(1)  # one step may materialise several assets: its seconds go to all of them
            step_s[key] = round(step_s.get(key, 0.0) + float(m.group(3)), 2)
    return secs, units, step_s


def main() -> None:
    """Both runs of every variant; print and append the rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default=str(ROOT / "lakehouse" / "demo"))
    ap.add_argument("--dimensions", type=int, default=65536)
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--copies", type=int, default=1, help="copies of the demo corpus to score")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reattribution.jsonl"))
    args = ap.parse_args()
    if args.copies < 1:
        raise SystemExit(f"--copies must be >= 1, got {args.copies}")
    world = Path(args.world).resolve()
    if not (world / "models" / "finetuned").exists():
        raise SystemExit(f"{world}: no demo world; run `make demo` first")
    for name in args.variants.split(","):
        methods, cands, index = VARIANTS[name]
        base = ROOT / "bench" / "out" / "reattribution" / name
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        shutil.copytree(world / "models" / "finetuned", base / "finetuned")
        corpus = world / "data" / "corpus.parquet"
        if args.copies > 1:
            one = pd.read_parquet(corpus)
            corpus = base / "corpus.parquet"
            pd.concat([one] + [one.assign(doc_id=one.doc_id.astype(str) + f"~{i}") for i in range(1, args.copies)],
                      ignore_index=True).to_parquet(corpus)
        toml = base / "experiment.toml"
        toml.write_text(f"""[lakehouse]
root = "lakehouse"
[models]
pretrained = "{world / 'models' / 'pretrained'}"
finetuned = "finetuned"
[data]
pretraining_corpus = "{corpus}"
finetuning_data = "{world / 'data' / 'finetune.jsonl'}"
queries = "{world / 'data' / 'queries.jsonl'}"
shard_size = 1000
[factors]
max_length = 128
batch_size = 32
[scores]
methods = {methods}
candidates = {cands}
{index.format(k=args.dimensions, r=args.rerank)}""")
        for step in ("first", "new_finetune"):
            if step == "new_finetune":
                perturb(base / "finetuned", seed=1)
            secs, units, step_s = run(toml)
            lake = base / "lakehouse"
            parts = sorted((lake / "tables" / "influence_scores").glob("*.parquet"))
            scores = pd.concat([pd.read_parquet(p) for p in parts])
            quality = pd.read_parquet(lake / "tables" / "attribution_quality.parquet")
            emit({"variant": name, "run": step, "seconds": round(secs, 1), "units": len(units), "step_seconds": step_s,
                  "steps_seconds_total": round(sum(step_s.values()), 1),
                  "index_partitions_built": sum(u.startswith("influence_index") for u in units),
                  "materialised": sorted({u.split("[")[0] for u in units}),
                  "exact_ms_if_pairs": int((scores.method == "ms_if").sum()),
                  "copies": args.copies, "documents": int(pd.read_parquet(corpus, columns=["doc_id"]).shape[0]),
                  "dimensions": args.dimensions if index else 0, "rerank": args.rerank if cands == '"index"' else None,
                  "quality": {r.method: {"mrr": round(float(r.mrr), 4), "recall_at_10": round(float(r.recall_at_k), 4)}
                              for r in quality.itertuples()}}, args.out)


if __name__ == "__main__":
    main()
