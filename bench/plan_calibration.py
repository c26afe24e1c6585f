"""Calibrate the memory plan's activation estimate: resident memory of the runtime and of one document
batch's forward+backward (with msif's captures), against ``msif_core.plan.batch_bytes``.

Run:  .venv/bin/python bench/plan_calibration.py [--shape pythia-160m] [--batches 2,4] [--doc-length 256]

Each batch size runs in a fresh process (``ru_maxrss`` is per process). Row fields: ``runtime_gib`` (the
process after imports, before the model), ``model_gib``, ``batch_gib`` (peak minus runtime and model),
``per_token_mib`` (that per document token), ``plan_per_token_mib`` (what the plan assumes, activations and
logits, without the gradient row), ``captured_per_token_mib`` (the a and ds msif captures). Rows go to
bench/results/plan_calibration.jsonl.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rows import emit  # noqa: E402

MIB = 2**20


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096


def one(shape: str, batch: int, length: int) -> dict:
    """One batch size in this process."""
    import torch
    from bench_scale import _docs, _model

    from msif_core.data import iter_batches
    from msif_core.gradients import analysed_grads_only, forward_backward
    from msif_core.memory import retain_freed_memory
    from msif_core.models import discover_modules
    from msif_core.plan import ACTIVATION_FACTOR, LOGIT_COPIES, vocab_size

    retain_freed_memory()
    runtime = _rss()
    model = _model(shape, 0, torch.float32, "cpu")
    specs = discover_modules(model)
    base = _rss()
    with analysed_grads_only(model, specs):
        for b in iter_batches(_docs(batch, length, 1), batch, 0):
            forward_backward(model, specs, b, fisher="empirical")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    width = sum(s.out_features + s.d for s in specs)
    tokens = batch * length
    planned = ACTIVATION_FACTOR * width * 4 + LOGIT_COPIES * vocab_size(model) * 4
    return {"shape": shape, "batch": batch, "doc_length": length, "runtime_gib": round(runtime / 2**30, 3),
            "model_gib": round((base - runtime) / 2**30, 3), "batch_gib": round((peak - base) / 2**30, 3),
            "per_token_mib": round((peak - base) / tokens / MIB, 3),
            "plan_per_token_mib": round(planned / MIB, 3),
            "captured_per_token_mib": round(width * 4 / MIB, 3)}


def main() -> None:
    """Every batch size, each in its own process; print and append the rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="pythia-160m")
    ap.add_argument("--batches", default="2,4")
    ap.add_argument("--doc-length", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_calibration.jsonl"))
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.shape, args.one, args.doc_length)))
        return
    for b in (int(x) for x in args.batches.split(",")):
        r = subprocess.run([sys.executable, __file__, "--one", str(b), "--shape", args.shape, "--doc-length",
                            str(args.doc_length)], capture_output=True, text=True, check=True)
        emit(json.loads(r.stdout.strip().splitlines()[-1]), args.out)


if __name__ == "__main__":
    main()
