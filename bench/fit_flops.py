"""Floating-point operations per token of a training pass and of msif's EK-FAC fit, counted from the
model's shapes (no timing): why the fit's cost relative to training depends on the model's widths.

Run:  .venv/bin/python bench/fit_flops.py [--sizes small,large] [--lengths 512,128]

Counts multiply-adds as 2 flops, over the analysed linear modules, the LM head and attention
(QKᵀ and AV over all T positions):
- ``train``: forward + backward with input and weight gradients (6 per weight) + attention (3 × 4·T·h);
- ``fit_forward_backward``: what both passes share: forward + input-gradient backward (4 per weight) +
  attention; weight gradients are never formed;
- ``fit_covariances``: Σ a aᵀ and Σ ds dsᵀ per token, with the banded upper-triangle sums of
  ``msif_core.ekfac`` for wide matrices;
- ``fit_lambda``: the Λ pass's rotations into the eigenbases, on the branch ``msif_core.ekfac`` picks
  for this length (per-sequence gradient, or every token's a and ds), including forming the gradients;
- ``fit`` = the three, for documents whose gradients the pass cache holds (``FitSettings.cache_mib``);
  ``fit_uncached`` adds the Λ pass's own forward and backward for documents beyond it.
The float64 eigendecompositions (a fixed cost per fit) are not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_core import SIZES, VOCAB  # noqa: E402
from msif_core.ekfac import _bands, _per_sequence_branch  # noqa: E402


def _gram(d: int) -> float:
    """Flops per token of one [d, d] covariance sum as msif forms it."""
    edges = _bands(d)
    if not edges:
        return 2.0 * d * d
    return 2.0 * sum((hi - lo) * (d - lo) for lo, hi in zip(edges[:-1], edges[1:]))


def count(size: str, length: int) -> dict:
    """Flops per token (millions) of training and of each part of the fit."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from msif_core.models import discover_modules

    cfg = GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=max(length, 128), **SIZES[size])
    specs = discover_modules(GPTNeoXForCausalLM(cfg))
    weights = sum(s.out_features * s.d for s in specs) + VOCAB * cfg.hidden_size
    attention = 3 * 4 * length * cfg.hidden_size * cfg.num_hidden_layers
    cov = lam = 0.0
    for s in specs:
        cov += _gram(s.d) + (_gram(s.p) if s.n_blocks == 1 else 2.0 * s.n_blocks * s.p * s.p)
        form = 2.0 * s.out_features * s.d  # Σ_t ds_t a_tᵀ, per token
        if _per_sequence_branch(s, length):
            lam += form + 2.0 * s.out_features * s.d * (s.p + s.d) / length
        else:
            lam += 2.0 * (s.d * s.d + s.out_features * s.p) + form
    res = {"size": size, "length": length, "train": 6.0 * weights + attention,
           "fit_forward_backward": 4.0 * weights + attention, "fit_covariances": cov, "fit_lambda": lam}
    res = {k: v / 1e6 if isinstance(v, float) else v for k, v in res.items()}
    res["fit"] = res["fit_forward_backward"] + res["fit_covariances"] + res["fit_lambda"]
    res["fit_over_train"] = res["fit"] / res["train"]
    # documents beyond FitSettings.cache_mib: the Λ pass runs its own forward and backward over them
    res["fit_uncached"] = res["fit"] + res["fit_forward_backward"]
    res["fit_uncached_over_train"] = res["fit_uncached"] / res["train"]
    return res


def score_count(size: str, length: int, n_docs: int, queries: int, rank: int = 32) -> dict:
    """Flops per document (millions) of one ``score_documents`` call over ``n_docs`` documents of ``length``
    tokens against ``queries`` rank-``rank`` query iHVPs, on the contraction it picks per module
    (``msif_core.scoring._costs``): the forward and input-gradient backward, the contraction, and (for
    modules on the dense route) laying the iHVPs out as dense matrices, once per call."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from msif_core.models import discover_modules
    from msif_core.scoring import _costs

    cfg = GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=max(length, 128), **SIZES[size])
    specs = discover_modules(GPTNeoXForCausalLM(cfg))
    weights = sum(s.out_features * s.d for s in specs) + VOCAB * cfg.hidden_size
    forward_backward = (4.0 * weights + 3 * 4 * length * cfg.hidden_size * cfg.num_hidden_layers) * length
    contraction = layout = 0.0
    for s in specs:
        dense, low = _costs(s, length, queries, rank)
        contraction += 2.0 * min(dense, low)
        if dense <= low:
            layout += 2.0 * queries * rank * s.out_features * s.d / n_docs
    total = forward_backward + contraction + layout
    return {"what": "score", "size": size, "length": length, "documents": n_docs, "queries": queries,
            "forward_backward": forward_backward / 1e6, "contraction": contraction / 1e6,
            "layout": layout / 1e6, "pass": (forward_backward + contraction) / 1e6, "whole": total / 1e6}


def main() -> None:
    """Print the counts as JSON lines: the fit's (MFLOP per token), then scoring's (MFLOP per document, and
    64 queries over 1, as ``bench_core.py`` measures them)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--lengths", default="512,128")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per scoring call, as bench_core.py")
    args = ap.parse_args()

    def rounded(d: dict) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}

    for size in args.sizes.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            print(json.dumps(rounded(count(size, length))))
    for size in args.sizes.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            for n_docs in sorted({args.tokens // length, 32}):
                one, many = score_count(size, length, n_docs, 1), score_count(size, length, n_docs, 64)
                print(json.dumps(rounded(many | {"q64_over_q1_whole": many["whole"] / one["whole"],
                                                 "q64_over_q1_pass": many["pass"] / one["pass"]})))


if __name__ == "__main__":
    main()
