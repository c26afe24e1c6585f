"""``msif run --force`` with 1 and with 2 workers on a four-shard world: what running partitions in parallel
buys on this machine.

Run:  .venv/bin/python bench/workers.py [--workers 1 2] [--shard-size 460] [--out bench/results/workers.jsonl]

The world is the demo's (its data and checkpoints under lakehouse/demo: ``make demo`` first) in shards of
``--shard-size`` documents (460: four shards of the 1,831 documents), every method of the demo, in a fresh
lakehouse under bench/out/. Each worker count first materialises everything once (``msif run``), then times
``msif run --force --workers N`` (every asset recomputed; the world and the input checks are warm). Rows:
``workers``, ``shards``, ``seconds`` (wall time of the forced run), ``runs``, ``cores``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-size", type=int, default=460)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "workers.jsonl"))
    args = ap.parse_args()
    from rows import emit

    demo = ROOT / "lakehouse" / "demo"
    if not (demo / "models" / "pretrained").exists():
        raise SystemExit("build the demo world first: make demo")
    toml = (ROOT / "dagster_project" / "demo.toml").read_text()
    toml = toml.replace('root = "."', 'root = "{root}"').replace("shard_size = 1000", f"shard_size = {args.shard_size}")
    for rel in ("models/pretrained", "models/finetuned", "data/corpus.parquet", "data/finetune.jsonl",
                "data/queries.jsonl"):
        toml = toml.replace(f'"{rel}"', json.dumps(str(demo / rel)))
    msif = str(Path(sys.executable).with_name("msif"))
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    for n in args.workers:
        work = ROOT / "bench" / "out" / f"workers_{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        exp = work / "experiment.toml"
        exp.write_text(toml.replace("{root}", str(work / "lakehouse")))
        first = subprocess.run([msif, "run", str(exp), "--workers", str(n)], env=env, capture_output=True, text=True)
        if first.returncode != 0:
            raise SystemExit(first.stdout[-3000:] + first.stderr[-3000:])
        t0 = time.perf_counter()
        r = subprocess.run([msif, "run", str(exp), "--force", "--workers", str(n)], env=env, capture_output=True,
                           text=True)
        secs = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
        runs = next((int(x.split()[0]) for x in r.stdout.splitlines() if " runs succeeded" in x), None)
        shards = len(list((work / "lakehouse" / "tables" / "influence_scores").glob("*.parquet")))
        row = {"workers": n, "shards": shards, "seconds": round(secs, 1), "runs": runs, "cores": os.cpu_count()}
        emit(row, args.out)
        print(json.dumps(row), flush=True)
        print("\n".join(x for x in r.stdout.splitlines()[-14:]), flush=True)


if __name__ == "__main__":
    main()
