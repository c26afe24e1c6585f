"""``msif``: run the attribution pipeline in-process and print what it found.

- ``msif run [PATH] [--force]`` — materialise what is missing or stale (everything with ``--force``) for
  the experiment at PATH (else ``$MSIF_CONFIG``, else the built-in demo world under ./lakehouse/demo),
  then print, for a few test questions, the fine-tuned model's answer and the top documents by MS-IF
  with their text and whether they are true sources, and the per-method MRR / Recall@10 table.
- ``msif ui [PATH]`` — the Dagster UI (``dagster dev``) on the same experiment and the same instance.

Run history lives in a Dagster instance at ``$DAGSTER_HOME`` if set, else ``<root>/.dagster``; that is
what lets a second ``msif run`` recompute only what changed.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

DAGSTER_YAML = Path(__file__).with_name("dagster.yaml")  # the instance settings (run queue, pools, logs)


def instance_dir(root: Path) -> Path:
    """The Dagster home ``msif`` uses: ``$DAGSTER_HOME`` or ``<root>/.dagster`` (created with
    :data:`DAGSTER_YAML` as its dagster.yaml)."""
    home = os.environ.get("DAGSTER_HOME")
    d = Path(home) if home else root / ".dagster"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "dagster.yaml").exists():
        (d / "dagster.yaml").write_text(DAGSTER_YAML.read_text())
    return d


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in ("dagster", "bm25s", "httpx", "sentence_transformers", "transformers", "lancedb", "urllib3",
                 "dagster.automation_condition_tester", "msif_core", "msif_assets", "filelock", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RUST_LOG", "error")


def _print_summary(cfg, n_queries: int = 3, top: int = 5) -> None:
    from msif_assets.layout import Layout
    from msif_assets.views import SQL_DIR, connect, run_named
    from msif_core.methods import MIXED, headline

    layout = Layout(cfg.root)
    con = connect(layout)
    try:
        methods = [r[0] for r in con.execute("SELECT DISTINCT method FROM influence_scores_by_shard").fetchall()]
        method = headline(methods)
        queries = con.execute("SELECT query_id, prompt, completion, answer, answer_correct FROM queries "
                              "WHERE scored ORDER BY query_id LIMIT ?", [n_queries]).fetchall()
        print(f"\nTop documents by {method} (rank 1 = most supporting; ✓ = a true source of the fact)")
        for qid, prompt, completion, answer, correct in queries:
            print(f"\n  [{qid}] {' '.join(prompt.split())}  →  expected: {completion.strip()}")
            if answer is not None:
                mark = "" if correct is None else (" (correct)" if correct else " (wrong)")
                print(f"        fine-tuned model answers: {answer.strip()}{mark}")
            rows = con.execute("SELECT rank, doc_id, score, is_true_source, text FROM top_influences "
                               "WHERE query_id = ? AND method = ? AND rank <= ? ORDER BY rank", [qid, method, top]
                               ).fetchall()
            for rank, doc_id, score, is_true, text in rows:
                mark = "✓" if is_true else " "
                snippet = textwrap.shorten(text.replace("\n", " "), 90, placeholder="…")
                print(f"     {rank:>2}. {mark} {doc_id:<10} {score:>11.4g}  {snippet}")
        has_truth = con.execute("SELECT count(*) FROM queries WHERE scored AND true_doc_ids IS NOT NULL AND "
                                "len(true_doc_ids) > 0").fetchone()[0]
        if has_truth:
            q = run_named(con, "quality")
            print(f"\nFact-tracing quality over {int(q.n_queries.max())} queries "
                  f"(candidates per query and shard: {cfg.scores.candidates})")
            w = max(10, *(len(m) for m in q.method))
            print(f"  {'method':<{w}} {'MRR':>7} {'Recall@10':>10}")
            for r in q.itertuples():
                note = f"  (mixed: fuses the ranks of {' and '.join(MIXED[r.method])})" if r.method in MIXED else ""
                print(f"  {r.method:<{w}} {r.mrr:>7.3f} {r.recall_at_k:>10.3f}{note}")
    finally:
        con.close()
    print(f"\nSQL:    duckdb {layout.database}   (views: influence_scores, top_influences, documents, queries)")
    print(f"        named queries: {SQL_DIR}/*.sql")
    print(f"Report: {layout.reports / 'attribution_report.md'} (+ .png)")


def cmd_run(args: argparse.Namespace) -> int:
    """``msif run``."""
    _quiet()
    import dagster as dg
    import duckdb

    from msif_assets.build import build_definitions
    from msif_assets.config import ConfigError
    from msif_assets.io import CorruptTableError
    from msif_assets.lock import LakehouseBusy, locked
    from msif_assets.preflight import preflight
    from msif_assets.runner import Pipeline

    from .demo import ensure_demo_world, load_experiment

    t0 = time.perf_counter()
    try:
        cfg = load_experiment(args.path, check_files=False)
        t_world = time.perf_counter()
        if cfg.is_demo:
            print(f"No experiment file given: using the demo world under {cfg.root}")
            ensure_demo_world(cfg)
        t_world = time.perf_counter() - t_world
        notes = preflight(cfg)
    except ConfigError as e:
        print(f"msif: configuration error: {e}", file=sys.stderr)
        return 2
    print(f"Experiment: {cfg.source or 'demo'}\nLakehouse:  {cfg.root}\nMethods:    {', '.join(cfg.scores.methods)}")
    for n in notes:
        print(f"note: {n}")
    try:
        with locked(cfg.root, wait=not args.no_wait, on_wait=lambda m: print(f"msif: {m}", flush=True)):
            defs = build_definitions(cfg)
            home = instance_dir(cfg.root)
            instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else \
                dg.DagsterInstance.local_temp(tempdir=str(home))
            # failures are printed once by the pipeline (their root cause); Dagster's own console logger would
            # repeat each with its traceback (all of it stays in the run logs of the instance)
            pipe = Pipeline(defs, instance, cfg, echo=print, log_level="CRITICAL", workers=args.workers)
            res = pipe.materialize_all() if args.force else pipe.update()
    except LakehouseBusy as e:
        print(f"msif: {e}", file=sys.stderr)
        return 3
    n_ok = sum(r.success for r in res.runs)
    print(f"\n{n_ok} runs succeeded, {len(res.failures)} failed, in {res.seconds:.1f}s"
          + ("" if res.runs else " (everything was up to date)"))
    if res.failures:
        names = [f"{', '.join(r.errors_in)}{f' [{r.partition}]' if r.partition else ''}" for r in res.failures]
        print(f"msif: failed: {'; '.join(names)} (the error is on its FAIL line above); fix it and run `msif run` "
              f"again: it redoes only what failed and what depends on it", file=sys.stderr)
    try:
        if res.failures and Path(cfg.root, "msif.duckdb").exists():
            print("\nThe results below are those of an EARLIER run: the steps above that failed or were skipped "
                  "did not update them.")
        _print_summary(cfg, n_queries=args.queries)
    except (FileNotFoundError, CorruptTableError, duckdb.Error) as e:
        print(f"no results to show: {e}", file=sys.stderr)
        return 1
    print(_time_summary(res.runs, t_world if cfg.is_demo else 0.0))
    print(f"\nTotal {time.perf_counter() - t0:.1f}s.  Instance: {home}")
    return 1 if res.failures else 0


def _time_summary(runs: list, world_s: float) -> str:
    """Where the time went: seconds per asset group (all partitions of it together), largest first."""
    by: dict[str, list[float]] = {}
    for r in runs:
        key = " + ".join(r.assets)
        by.setdefault(key, []).append(r.seconds)
    rows = sorted(((sum(v), len(v), k) for k, v in by.items()), reverse=True)
    lines = ["\nWhere the time went:"]
    if world_s >= 0.5:
        lines.append(f"  {world_s:7.1f}s  demo world: generate, train tokenizer, pre-train and fine-tune the models")
    for secs, n, key in rows:
        lines.append(f"  {secs:7.1f}s  {key}" + (f"  ({n} runs)" if n > 1 else ""))
    return "\n".join(lines)


def cmd_ui(args: argparse.Namespace) -> int:
    """``msif ui``: ``dagster dev`` on the experiment, sharing ``msif run``'s instance."""
    from msif_assets.config import ConfigError
    from msif_assets.preflight import preflight

    from .demo import ensure_demo_world, load_experiment

    try:
        cfg = load_experiment(args.path, check_files=False)
        ensure_demo_world(cfg)  # before the UI starts, so the code server loads fast
        for n in preflight(cfg):
            print(f"note: {n}")
    except ConfigError as e:
        print(f"msif: configuration error: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.path:
        env["MSIF_CONFIG"] = str(Path(args.path).resolve())
    env.setdefault("DAGSTER_HOME", str(instance_dir(cfg.root)))
    cmd = [str(Path(sys.executable).with_name("dagster")), "dev", "-m", "dagster_project.definitions"]
    print(f"DAGSTER_HOME={env['DAGSTER_HOME']} {' '.join(cmd)}")
    return subprocess.call(cmd, env=env)


def _workers(v: str) -> int:
    """``--workers``: a positive number or ``auto`` (the CPU cores)."""
    if v == "auto":
        return max(1, os.cpu_count() or 1)
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"--workers must be a positive number or 'auto', got {v!r}")
    return int(v)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``msif`` console script."""
    parser = argparse.ArgumentParser(prog="msif", description="Multi-stage influence functions as a Dagster "
                                                               "lakehouse pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="materialise the pipeline in-process and print a summary")
    p.add_argument("path", nargs="?", help="experiment TOML (default: $MSIF_CONFIG, else the demo world)")
    p.add_argument("--force", action="store_true", help="recompute every asset, not only what is stale")
    p.add_argument("--queries", type=int, default=3, help="test questions to show (default 3)")
    p.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="Dagster runs at once, each in a worker process of its own (independent partitions in "
                        "parallel); "
                        "'auto' = the number of CPU cores; default 1: every run in this process")
    p.add_argument("--no-wait", action="store_true",
                   help="refuse (exit 3) instead of waiting when another msif run holds the lakehouse")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on the experiment")
    p.add_argument("path", nargs="?", help="experiment TOML (default: $MSIF_CONFIG, else the demo world)")
    p.set_defaults(func=cmd_ui)
    args = parser.parse_args(argv)
    from msif_core.memory import retain_freed_memory

    retain_freed_memory()
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
