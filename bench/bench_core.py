"""Speed and memory of the core engine against a plain training pass and against kronfluence.

Run:  .venv/bin/python bench/bench_core.py [--sizes small,large] [--lengths 512,128] [--tokens 16384] [--device cpu]

For each GPT-NeoX size and document length (random tokens; speed does not depend on the values), over
the same number of tokens at every length (``--tokens``: 32 documents of 512 tokens, 128 of 128):
- ``train``: one plain training pass (forward + backward with weight gradients) over the documents;
- ``fit``: msif's EK-FAC fit (covariance pass + eigendecomposition + Λ pass, true Fisher), timed in a
  warm process as the training pass is (``fit_cold_s``: the first fit of the process); ``eigh_s`` is its
  float64 eigendecomposition, a fixed cost; ``passes_over_train`` leaves it out;
- ``kf_fit``: kronfluence's ``fit_all_factors`` (EK-FAC, true Fisher) on the same model and data;
- ``score64`` / ``score1``: msif scoring of the documents against 64 (rank-32) / 1 query iHVPs, whole
  call and (``_pass``) the pass over the documents alone, without the once-per-call layout of the iHVPs;
- ``kf_pairs``: kronfluence's ``compute_pairwise_scores`` for the same 64 queries x documents.
Each configuration runs in a fresh subprocess so that its peak resident memory is its own.
Results go to bench/out/core.json and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # blocks ≈ 1.57M parameters: the paper's section 5.1 model (hidden 256, 2 layers, 2 heads)
    "small": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=2, intermediate_size=1024),
    # blocks ≈ 18.9M parameters
    "large": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    # blocks ≈ 85M parameters: Pythia-160M's shape (for a GPU)
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
VOCAB = 4096
N_QUERIES, RANK = 64, 32


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timeit(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def run_config(size: str, length: int, n_docs: int, batch_size: int, kronfluence: bool, cache_mib: int | None,
               device: str, retain: bool, out: mp.Queue) -> None:
    """Measure one (size, length) configuration; puts a dict on ``out``."""
    import torch
    import torch.nn.functional as F
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from msif_core.data import Encoded, iter_batches
    from msif_core.ekfac import FitSettings, fit_ekfac
    from msif_core.memory import retain_freed_memory
    from msif_core.models import discover_modules
    from msif_core.query import measurement_gradients, query_ihvps
    from msif_core.scoring import score_documents

    if retain:
        retain_freed_memory()
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(2)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=max(length, 128), **SIZES[size])
    model = GPTNeoXForCausalLM(cfg).eval().to(device)
    specs = discover_modules(model)
    n_block_params = sum(s.out_features * s.d for s in specs)
    ids = torch.randint(0, VOCAB, (n_docs, length))
    docs = Encoded(ids.tolist(), [[False] + [True] * (length - 1)] * n_docs)
    q_len = min(length, 64)
    q_ids = torch.randint(0, VOCAB, (N_QUERIES, q_len))
    queries = Encoded(q_ids.tolist(), [[False] * (q_len // 2) + [True] * (q_len - q_len // 2)] * N_QUERIES)
    res: dict = {"size": size, "length": length, "documents": n_docs, "block_params": n_block_params,
                 "batch_size": batch_size, "retain_memory": retain,
                 "device": torch.cuda.get_device_name() if device == "cuda" else device}

    def train_pass() -> None:
        for b in iter_batches(docs, batch_size):
            b = b.to(device)
            out = model(input_ids=b.input_ids, labels=b.input_ids)
            out.loss.backward()
        model.zero_grad(set_to_none=True)

    train_pass()  # warm-up
    res["train_s"] = _timeit(train_pass, 2)
    settings = FitSettings(fisher="true", batch_size=batch_size, cache_mib=cache_mib)
    factors = None

    def fit() -> None:
        nonlocal factors
        factors = fit_ekfac(model, specs, docs, settings)

    # like the training pass (timed after a warm-up), the fit is timed in a warm process; the first, cold
    # fit is kept too: it pays the first touch of its memory (slow on these virtual machines)
    res["fit_cold_s"] = _timeit(fit)
    res["eigh_cold_s"] = factors.manifest["eigh_seconds"]
    res["fit_s"] = _timeit(fit)
    res["fit_over_train"] = res["fit_s"] / res["train_s"]
    # the float64 eigendecompositions cost the same for any number of documents
    res["eigh_s"] = factors.manifest["eigh_seconds"]
    # batches whose gradients the Λ pass took from memory, of all, and the memory they held
    cache = factors.manifest["pass_cache"]
    res["cached_batches"], res["all_batches"], res["cache_mib_used"] = (cache["batches"], cache["of_batches"],
                                                                         cache["mib"])
    res["cache_budget_mib"] = cache["budget_mib"]
    res["passes_over_train"] = (res["fit_s"] - res["eigh_s"]) / res["train_s"]
    res["cold_passes_over_train"] = (res["fit_cold_s"] - res["eigh_cold_s"]) / res["train_s"]
    res["factor_floats"] = factors.n_floats()
    res["factor_floats_formula"] = sum(s.d ** 2 + s.n_blocks * s.p ** 2 + s.d * s.out_features for s in specs)
    grads = measurement_gradients(model, specs, queries, batch_size)
    ih64 = query_ihvps(grads, specs, "ss_if", ft_factors=factors, damping_ft=1e-4, rank=RANK)
    ih1 = query_ihvps(grads.select(slice(0, 1)), specs, "ss_if", ft_factors=factors, damping_ft=1e-4,
                      rank=RANK)
    runs: dict[int, list] = {64: [], 1: []}
    for _ in range(2):
        for nq, ih in ((64, ih64), (1, ih1)):
            _sync()
            r = score_documents(model, ih, docs, batch_size).timings
            runs[nq].append((r["setup_s"] + r["seconds"], r["seconds"], r["setup_s"]))
    (res["score64_s"], res["score64_pass_s"], res["score64_setup_s"]) = min(runs[64])
    (res["score1_s"], res["score1_pass_s"], res["score1_setup_s"]) = min(runs[1])
    res["score64_over_score1"] = res["score64_s"] / res["score1_s"]
    # steady state: the pass over the documents, without the once-per-call layout of the query iHVPs
    res["score64_pass_over_score1_pass"] = res["score64_pass_s"] / res["score1_pass_s"]
    res["score_throughput_vs_train"] = res["train_s"] / res["score64_pass_s"]
    res["train_docs_per_s"] = n_docs / res["train_s"]
    res["score64_docs_per_s"] = n_docs / res["score64_pass_s"]

    if kronfluence:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        names = [s.name for s in specs]

        class LMTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
                logits = logits.reshape(-1, logits.size(-1))
                if sample:
                    with torch.no_grad():
                        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                else:
                    labels = batch["input_ids"][:, 1:].flatten()
                return F.cross_entropy(logits, labels, reduction="sum")

            def compute_measurement(self, batch, model):
                logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
                return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].flatten(),
                                       reduction="sum", ignore_index=-100)

            def get_influence_tracked_modules(self):
                return names

        class DS(torch.utils.data.Dataset):
            def __init__(self, x: torch.Tensor, prompt: int = 0) -> None:
                self.x, self.prompt = x, prompt

            def __len__(self) -> int:
                return len(self.x)

            def __getitem__(self, i: int) -> dict:
                lab = self.x[i].clone()
                lab[: self.prompt] = -100
                return {"input_ids": self.x[i], "labels": lab}

        kmodel = prepare_model(GPTNeoXForCausalLM(cfg).eval().to(device), LMTask())
        with tempfile.TemporaryDirectory() as tmp:
            an = Analyzer("bench", kmodel, LMTask(), output_dir=tmp, disable_tqdm=True, disable_model_save=True)
            fargs = FactorArguments(strategy="ekfac")
            _sync()
            t0 = time.perf_counter()
            an.fit_all_factors("f", DS(ids), per_device_batch_size=batch_size, factor_args=fargs,
                               overwrite_output_dir=True)
            _sync()
            res["kf_fit_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            an.compute_pairwise_scores("s", "f", query_dataset=DS(q_ids, q_len // 2), train_dataset=DS(ids),
                                       per_device_query_batch_size=N_QUERIES, per_device_train_batch_size=batch_size,
                                       score_args=ScoreArguments(damping_factor=1e-4), overwrite_output_dir=True)
            _sync()
            res["kf_pairs_s"] = time.perf_counter() - t0
        # msif's pairwise time on the same pairs: query gradients + iHVPs + scoring (exact, not rank-32)
        t0 = time.perf_counter()
        g = measurement_gradients(model, specs, queries, batch_size)
        ih = query_ihvps(g, specs, "ss_if", ft_factors=factors, damping_ft=1e-4)
        score_documents(model, ih, docs, batch_size)
        _sync()
        res["msif_pairs_s"] = time.perf_counter() - t0
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    out.put(res)


def main() -> None:
    """Run the configurations and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--lengths", default="512,128")
    ap.add_argument("--tokens", type=int, default=16384,
                    help="tokens per configuration: tokens // length documents")
    ap.add_argument("--docs", type=int, default=None, help="documents per configuration (overrides --tokens)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-kronfluence", action="store_true")
    ap.add_argument("--cache-mib", type=int, default=None,
                    help="FitSettings.cache_mib of msif's fit (default: its automatic budget)")
    ap.add_argument("--no-retain-memory", action="store_true",
                    help="leave glibc's malloc as it is (msif_core.memory.retain_freed_memory not called)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the GPU)")
    ap.add_argument("--out", default="bench/out/core.json")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for size in args.sizes.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            q = ctx.Queue()
            n_docs = args.docs or max(1, args.tokens // length)
            p = ctx.Process(target=run_config, args=(size, length, n_docs, args.batch_size,
                                                     not args.no_kronfluence, args.cache_mib, args.device,
                                                     not args.no_retain_memory, q))
            p.start()
            r = q.get()
            p.join()
            rows.append(r)
            print(json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    cols = ["size", "length", "block_params", "train_s", "fit_s", "eigh_s", "fit_over_train", "passes_over_train",
            "cold_passes_over_train",
            "kf_fit_s", "score64_s", "score1_s", "score64_over_score1", "score64_pass_over_score1_pass",
            "score_throughput_vs_train", "msif_pairs_s", "kf_pairs_s", "peak_rss_mib", "peak_gpu_mib"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")


if __name__ == "__main__":
    main()
