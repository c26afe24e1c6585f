"""msif against kronfluence: the same single-stage EK-FAC influence, on the same model, documents and queries.

Run:  .venv/bin/python bench/bench_kronfluence.py [--shape pythia-70m] [--queries 25] [--docs 64]
          [--doc-length 256] [--query-length 32] [--query-batch-size 8] [--query-accumulation-steps 1]
          [--rank 0] [--batch-size 8] [--attention-blocks per_head] [--damping heuristic] [--memory-gib 8]
          [--fit-cache-mib N] [--device cpu] [--keep-outputs]
Pythia-160M, 25 queries x 64 documents of 256 tokens, kronfluence within ~8 GB:
      .venv/bin/python bench/bench_kronfluence.py --shape pythia-160m --queries 25 --docs 64 --query-batch-size 5
(kronfluence holds each query's preconditioned gradient dense, 4 bytes per analysed parameter: 0.34 GB a query at
Pythia-160M's 85M, on top of ~5 GB of model, factors and logits; with --rank 32 a query takes ~19 MB and all 25
fit in one batch.)

kronfluence is not a project dependency; install it into the venv for this comparison only:
    .venv/bin/pip install --no-deps kronfluence einops einconv opt-einsum accelerate

kronfluence has no two-stage score, so both tools compute the single-stage one, ``∇m(x)ᵀ (G + λI)⁻¹ ∇ℓ(z)``,
with ONE model: a GPT-NeoX of a Pythia shape with random weights (built locally from a config, nothing
downloaded; bench_scale's ``_model``, seed 0) serves as msif's pre-trained and fine-tuned model alike, and msif
scores with method ``ss_if`` (EK-FAC fitted on the documents themselves, documents scored through the same
model). The documents and queries are bench_scale's (``_docs`` seed 21, ``_queries`` seed 22: random tokens;
a query's first half is its prompt, its second half the completion). Each tool runs in its own process, so each
peak resident memory is that tool's alone:

- msif: ``msif_core.ekfac.fit_ekfac`` on the documents, then ``msif_core.api.gradient_tables`` (the memory plan
  of ``--memory-gib``, query chunks, one pass over the documents per chunk); the process calls
  ``retain_freed_memory()`` as msif's entry points do.
- kronfluence: ``prepare_model`` + ``Analyzer``, ``fit_all_factors`` (strategy "ekfac") on the documents, then
  ``compute_pairwise_scores`` over the queries in batches of ``--query-batch-size`` (one pass over the documents
  per batch; ``--query-accumulation-steps`` batches share a pass), read back with ``load_pairwise_scores``.
  Its files go to a temporary folder under bench/out/ (gitignored), removed at the end unless ``--keep-outputs``.

Conventions made to agree:

- Analysed modules: msif's (``discover_modules``: every layer's query_key_value, attention.dense,
  dense_h_to_4h, dense_4h_to_h, biases included); kronfluence tracks exactly those (``get_influence_tracked_modules``),
  not the embedding or the output head.
- Loss of a document: the summed next-token cross-entropy over every token but the first; measurement of a
  query: the summed −log p of its completion tokens (targets masked with -100 in kronfluence's batches), as in
  msif_core/gradients.py. Both scores are then positive when upweighting the document lowers −log p(completion).
- Curvature: the empirical Fisher on both sides (msif ``fisher="empirical"``, kronfluence
  ``use_empirical_fisher=True``; kronfluence samples labels by default). Both normalise the covariances by
  tokens and Λ by sequences. kronfluence keeps covariances and Λ in float32 (its defaults), msif in float64.
- Damping (``--damping``): ``heuristic`` (default) passes kronfluence ``damping_factor=None``, its heuristic
  0.1 × mean(Λ) of each module, and msif ``"relative:0.1"``, 0.1 × mean(Λ) of each block; a number is passed to
  both as an absolute λ. MLP and attention.dense modules are one block in msif, so there the two agree exactly.
- Blocks (``--attention-blocks``): msif's default ``per_head`` splits query_key_value into one block per
  (head, role) (block-diagonal S, per-block damping); kronfluence keeps the fused projection as one Kronecker
  factor. ``fused`` gives msif kronfluence's blocks, and then the two compute the same quantity up to float32
  rounding (and kronfluence's randomised SVD when ``--rank`` > 0).
- ``--rank`` r > 0: msif's ``query_rank`` (rank-r iHVP of each module's whole matrix) and kronfluence's
  ``query_gradient_low_rank`` (rank-r ``torch.svd_lowrank`` of each module's preconditioned query gradient).

Each row (bench/results/kronfluence.jsonl, via rows.emit) holds:

- configuration: ``shape``, ``device``, ``queries``, ``docs``, ``doc_length``, ``query_length``, ``rank``,
  ``batch_size`` (document batch of kronfluence's passes and of msif's fit; msif's scoring uses its plan's,
  ``msif_plan.batch_size``), ``query_batch_size`` and ``query_accumulation_steps`` (kronfluence),
  ``attention_blocks``, ``damping_msif`` and ``damping_kronfluence`` (what each was passed), ``memory_gib``
  (msif's plan), ``analysed_parameters``;
- kronfluence: ``kron_fit_s`` (``fit_all_factors``: covariance pass, eigendecomposition, Λ pass, files written),
  ``kron_score_s`` (``compute_pairwise_scores``: factors read, query gradients, the passes over the documents,
  scores written), ``kron_ms_per_doc_query`` (``kron_score_s`` per document per query, in ms), ``kron_passes``
  (passes over the documents), ``kron_rss_after_fit_gib`` and ``kron_peak_rss_gib`` (``ru_maxrss`` of its process
  after the fit and at the end), ``kron_peak_gpu_gib`` on a GPU (``torch.cuda.max_memory_allocated``);
- msif: ``msif_fit_s`` (``fit_ekfac``), ``msif_fit_cache`` (its pass cache: batches whose gradients the Λ pass
  reused instead of a second forward/backward), ``msif_query_s`` and ``msif_scoring_s`` (gradient_tables'
  query side and scoring passes), ``msif_score_s`` (their sum), ``msif_ms_per_doc_query``, ``msif_passes``,
  ``msif_plan`` (chunks, queries per chunk, document batch), ``msif_rss_after_fit_gib``, ``msif_peak_rss_gib``,
  ``msif_peak_gpu_gib``;
- agreement of the two [queries, docs] score matrices, per query over the documents: ``spearman_median``,
  ``spearman_min``, ``pearson_median``, and ``scale_median`` (median of ‖kronfluence row‖ / ‖msif row‖; 1 when
  the conventions agree), a sanity check rather than a quality measure;
- ``kronfluence_version``, and ``time`` (rows.emit).

What to expect of the agreement: with ``--attention-blocks fused`` the two compute the same scores (Spearman and
Pearson 1.0000 and ``scale_median`` 1.0000 on a small GPT-NeoX, with heuristic or absolute damping); with msif's
default per-head blocks only the query_key_value term differs, and that is enough to move the rankings (Spearman
~0.8 with heuristic damping, ~0.9 with an absolute 1e-3, on random weights and random tokens, where no document
stands out). With ``--rank`` r both are approximations of the exact score, each about as far from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_scale import _docs, _model, _queries  # noqa: E402
from rows import emit  # noqa: E402

INSTALL = "/work/main/.venv/bin/pip install --no-deps kronfluence einops einconv opt-einsum accelerate"
DOC_SEED, QUERY_SEED, MODEL_SEED = 21, 22, 0


def _require_kronfluence() -> None:
    """Exit with the install command when kronfluence cannot be imported."""
    try:
        import kronfluence.analyzer  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"kronfluence is not importable ({e}). It is not a project dependency; install it into "
                         f"the venv for this comparison only with:\n    {INSTALL}") from e


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def _rss_gib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _damping(arg: str) -> tuple[float | None, float | str]:
    """(kronfluence's ``damping_factor``, msif's damping) for ``--damping``."""
    if arg == "heuristic":
        return None, "relative:0.1"
    value = float(arg)
    return value, value


class _Tokens(Dataset):
    """An ``Encoded`` as kronfluence batches: ``input_ids``, ``attention_mask`` and ``labels`` (the ids at target
    positions, -100 elsewhere; position 0 is never a target, as in msif)."""

    def __init__(self, encoded: Any) -> None:
        self.rows = []
        for ids, mask in zip(encoded.input_ids, encoded.loss_mask):
            x = torch.tensor(ids, dtype=torch.long)
            target = torch.tensor(mask, dtype=torch.bool)
            target[0] = False
            self.rows.append({"input_ids": x, "attention_mask": torch.ones_like(x),
                              "labels": torch.where(target, x, torch.full_like(x, -100))})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _summed_nll(batch: dict[str, torch.Tensor], model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
    """Σ over the batch's target tokens of −log p(token | prefix); ``sample`` draws the targets from the model."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    if sample:
        with torch.no_grad():
            drawn = torch.multinomial(torch.softmax(logits.detach().reshape(-1, logits.shape[-1]), dim=-1), 1)
            labels = torch.where(labels == -100, labels, drawn.reshape(labels.shape))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")


def _task(module_names: list[str]) -> Any:
    """A kronfluence ``Task``: documents' summed next-token loss, queries' summed completion −log p, msif's
    modules tracked."""
    from kronfluence.task import Task

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            return _summed_nll(batch, model, sample)

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            return _summed_nll(batch, model)

        def get_influence_tracked_modules(self) -> list[str]:
            return list(module_names)

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    return LanguageModelTask()


def _reset_gpu_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak(device: str) -> dict[str, float]:
    return {"peak_gpu_gib": _gib(torch.cuda.max_memory_allocated())} if device.startswith("cuda") else {}


def run_kronfluence(args: argparse.Namespace, work: Path) -> dict:
    """kronfluence's fit and pairwise scores in this process; the scores go to ``work/kron_scores.npy``."""
    _require_kronfluence()
    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    from msif_core.models import discover_modules

    model = _model(args.shape, MODEL_SEED, torch.float32, args.device)
    names = [s.name for s in discover_modules(model)]
    task = _task(names)
    model = prepare_model(model, task)
    analyzer = Analyzer("bench", model, task, cpu=args.device == "cpu", log_level=logging.WARNING,
                        disable_tqdm=True, output_dir=str(work / "kronfluence"))
    docs = _Tokens(_docs(args.docs, args.doc_length, DOC_SEED))
    queries = _Tokens(_queries(args.queries, args.query_length, QUERY_SEED))
    damping, _ = _damping(args.damping)
    _reset_gpu_peak(args.device)
    t0 = time.perf_counter()
    analyzer.fit_all_factors("ekfac", docs, per_device_batch_size=args.batch_size, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
    fit_s = time.perf_counter() - t0
    rss_fit = _rss_gib()
    score_args = ScoreArguments(damping_factor=damping, query_gradient_low_rank=args.rank or None,
                                query_gradient_accumulation_steps=args.query_accumulation_steps)
    t0 = time.perf_counter()
    analyzer.compute_pairwise_scores("pairwise", "ekfac", queries, docs, overwrite_output_dir=True,
                                     per_device_query_batch_size=args.query_batch_size,
                                     per_device_train_batch_size=args.batch_size, score_args=score_args)
    score_s = time.perf_counter() - t0
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].double().numpy()  # [queries, docs]
    np.save(work / "kron_scores.npy", scores)
    per_pass = args.query_batch_size * args.query_accumulation_steps
    return {"fit_s": round(fit_s, 2), "score_s": round(score_s, 2), "passes": -(-args.queries // per_pass),
            "tracked_modules": len(names), "version": kronfluence.__version__, "rss_after_fit_gib": rss_fit,
            "peak_rss_gib": _rss_gib(), **_gpu_peak(args.device)}


def run_msif(args: argparse.Namespace, work: Path) -> dict:
    """msif's fit and ss_if scores in this process; the scores go to ``work/msif_scores.npy``."""
    from msif_core.api import AttributionSettings, gradient_tables
    from msif_core.checkpoints import LoadedModel
    from msif_core.ekfac import FitSettings, fit_ekfac
    from msif_core.memory import retain_freed_memory
    from msif_core.models import discover_modules
    from msif_core.stages import Stage

    retain_freed_memory()
    model = _model(args.shape, MODEL_SEED, torch.float32, args.device)
    specs = discover_modules(model, args.attention_blocks)
    stage = Stage(LoadedModel(model, None, "", "causal_lm"), specs)
    docs = _docs(args.docs, args.doc_length, DOC_SEED)
    queries = _queries(args.queries, args.query_length, QUERY_SEED)
    _, damping = _damping(args.damping)
    settings = AttributionSettings(methods=("ss_if",), fisher="empirical", attention_blocks=args.attention_blocks,
                                   damping_finetune=damping, query_rank=args.rank, memory_gib=args.memory_gib,
                                   batch_size=args.batch_size)
    _reset_gpu_peak(args.device)
    t0 = time.perf_counter()
    factors = fit_ekfac(model, specs, docs, FitSettings(fisher="empirical", batch_size=args.batch_size,
                                                         cache_mib=args.fit_cache_mib), stage.pad_id)
    fit_s = time.perf_counter() - t0
    rss_fit = _rss_gib()
    qids, dids = [f"q{i}" for i in range(len(queries))], [f"d{i}" for i in range(len(docs))]
    stats: dict = {}
    table = gradient_tables(stage, stage, queries, qids, docs, dids, settings, None, factors, stats=stats)["ss_if"]
    scores = table.pivot(index="query_id", columns="doc_id", values="score").loc[qids, dids].to_numpy(np.float64)
    np.save(work / "msif_scores.npy", scores)
    plan = stats["plan"]
    return {"fit_s": round(fit_s, 2), "fit_cache": factors.manifest.get("pass_cache"),
            "query_s": round(stats["query_s"], 2), "scoring_s": round(stats["score_s"], 2),
            "score_s": round(stats["query_s"] + stats["score_s"], 2), "passes": stats["passes"],
            "plan": {k: plan.get(k) for k in ("chunks", "queries_per_chunk", "batch_size")},
            "analysed_parameters": sum(s.out_features * s.d for s in specs),
            "rss_after_fit_gib": rss_fit, "peak_rss_gib": _rss_gib(), **_gpu_peak(args.device)}


def agreement(kron: np.ndarray, msif: np.ndarray) -> dict:
    """Per-query rank and linear correlation of two [queries, docs] score matrices, and their scale ratio."""
    from scipy.stats import pearsonr, spearmanr

    rho = [float(spearmanr(k, m).statistic) for k, m in zip(kron, msif)]
    r = [float(pearsonr(k, m).statistic) for k, m in zip(kron, msif)]
    scale = np.linalg.norm(kron, axis=1) / np.maximum(np.linalg.norm(msif, axis=1), 1e-300)
    return {"spearman_median": round(float(np.median(rho)), 4), "spearman_min": round(float(np.min(rho)), 4),
            "pearson_median": round(float(np.median(r)), 4), "scale_median": round(float(np.median(scale)), 4)}


def _child(tool: str, work: Path) -> dict:
    """Run ``tool`` in a fresh process (same arguments) and return its numbers."""
    cmd = [sys.executable, __file__, "--tool", tool, "--work", str(work)] + sys.argv[1:]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{tool} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    """Both tools, each in its own process; print and append the row."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="pythia-70m", choices=["pythia-70m", "pythia-160m"])
    ap.add_argument("--queries", type=int, default=25)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--doc-length", type=int, default=256)
    ap.add_argument("--query-length", type=int, default=32)
    ap.add_argument("--query-batch-size", type=int, default=8, help="kronfluence's per_device_query_batch_size")
    ap.add_argument("--query-accumulation-steps", type=int, default=1,
                    help="kronfluence's query_gradient_accumulation_steps (query batches per pass over the documents)")
    ap.add_argument("--rank", type=int, default=0,
                    help="msif's query_rank and kronfluence's query_gradient_low_rank (0: exact)")
    ap.add_argument("--batch-size", type=int, default=8, help="documents per forward/backward of the fits and of "
                                                               "kronfluence's scoring passes")
    ap.add_argument("--attention-blocks", default="per_head", choices=["per_head", "fused"],
                    help="msif's blocks of query_key_value (kronfluence's are 'fused')")
    ap.add_argument("--damping", default="heuristic",
                    help="'heuristic' (kronfluence: 0.1 x mean Λ per module; msif: relative:0.1, per block) or a "
                         "number passed to both")
    ap.add_argument("--memory-gib", type=float, default=8.0, help="msif's memory plan")
    ap.add_argument("--fit-cache-mib", type=float, default=None,
                    help="msif's fit pass cache (default: msif's own, a quarter of the memory available)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the temporary folder under bench/out/")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kronfluence.jsonl"))
    ap.add_argument("--tool", choices=["kronfluence", "msif"], help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    _damping(args.damping)  # a bad value fails here, before any work
    if args.tool:
        run = run_kronfluence if args.tool == "kronfluence" else run_msif
        print(json.dumps(run(args, Path(args.work))))
        return
    _require_kronfluence()
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"kronfluence_{args.shape}_", dir=ROOT / "bench" / "out"))
    try:
        kron = _child("kronfluence", work)
        ms = _child("msif", work)
        agree = agreement(np.load(work / "kron_scores.npy"), np.load(work / "msif_scores.npy"))
    finally:
        if not args.keep_outputs:
            shutil.rmtree(work, ignore_errors=True)
    pairs = args.docs * args.queries
    kron_damping, msif_damping = _damping(args.damping)
    row = {"shape": args.shape, "device": args.device, "queries": args.queries, "docs": args.docs,
           "doc_length": args.doc_length, "query_length": args.query_length, "rank": args.rank,
           "batch_size": args.batch_size, "query_batch_size": args.query_batch_size,
           "query_accumulation_steps": args.query_accumulation_steps, "attention_blocks": args.attention_blocks,
           "damping_msif": str(msif_damping),
           "damping_kronfluence": "None (0.1 x mean Λ)" if kron_damping is None else str(kron_damping),
           "memory_gib": args.memory_gib, "analysed_parameters": ms["analysed_parameters"],
           "kronfluence_version": kron["version"],
           "kron_fit_s": kron["fit_s"], "kron_score_s": kron["score_s"],
           "kron_ms_per_doc_query": round(1000 * kron["score_s"] / pairs, 3), "kron_passes": kron["passes"],
           "kron_rss_after_fit_gib": kron["rss_after_fit_gib"], "kron_peak_rss_gib": kron["peak_rss_gib"],
           "msif_fit_s": ms["fit_s"], "msif_fit_cache": ms["fit_cache"], "msif_query_s": ms["query_s"],
           "msif_scoring_s": ms["scoring_s"], "msif_score_s": ms["score_s"],
           "msif_ms_per_doc_query": round(1000 * ms["score_s"] / pairs, 3), "msif_passes": ms["passes"],
           "msif_plan": ms["plan"], "msif_rss_after_fit_gib": ms["rss_after_fit_gib"],
           "msif_peak_rss_gib": ms["peak_rss_gib"]}
    for tool, res in (("kron", kron), ("msif", ms)):
        if "peak_gpu_gib" in res:
            row[f"{tool}_peak_gpu_gib"] = res["peak_gpu_gib"]
    emit(row | agree, args.out)


if __name__ == "__main__":
    main()
