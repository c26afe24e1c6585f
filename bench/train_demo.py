"""Build the demo world and its two models; print timings, losses, accuracies and proximity.

    .venv/bin/python bench/train_demo.py                  # demo size, into bench/out/demo
    .venv/bin/python bench/train_demo.py --size large --out bench/out/large --force
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from msif_demo import DemoParams, build_demo


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build (or reuse) the demo, print a summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="demo", choices=["tiny", "demo", "large"])
    ap.add_argument("--out", type=Path, default=None, help="output directory (default bench/out/<size>)")
    ap.add_argument("--seed", type=int, default=None, help="world seed (default: the preset's)")
    ap.add_argument("--pretrain-epochs", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (results are identical; 1 is much faster when other processes load the cores)")
    ap.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    params = DemoParams(size=args.size, num_threads=args.threads)
    if args.seed is not None:
        params = dataclasses.replace(params, world=dataclasses.replace(params.world, seed=args.seed))
    if args.pretrain_epochs is not None:
        params = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, epochs=args.pretrain_epochs))
    if args.finetune_epochs is not None:
        params = dataclasses.replace(params, finetune=dataclasses.replace(params.finetune, epochs=args.finetune_epochs))
    out = args.out or Path(__file__).resolve().parent / "out" / args.size
    art = build_demo(out, params, force=args.force)
    r = art.report
    summary = {
        "out_dir": str(art.out_dir),
        "reused": art.reused,
        "world": r["world"],
        "model": r["model"],
        "pretrain": {k: r["pretrain"][k] for k in ("seconds", "tokens_per_s", "final_loss", "steps")},
        "finetune": {k: r["finetune"][k] for k in ("seconds", "tokens_per_s", "final_loss", "steps")},
        "pretrained_corpus_loss": r["pretrained_corpus_loss"],
        "source_answer_nll": r["source_answer_nll"],
        "accuracy": r["accuracy"],
        "proximity": r["proximity"],
        "timings": r["timings"],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
