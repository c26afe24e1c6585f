"""Re-attribution by the Dagster daemon: how long its runs take, and how much of that is Dagster's and
msif's per-run overhead rather than the steps' work.

Run:  .venv/bin/python bench/daemon_overhead.py [--docs 64] [--shard-size 16] [--label after]
          [--code PATH] [--out bench/results/daemon_overhead.jsonl]

On a tiny world (tests/helpers/pipeline.py's ``build_world``: ``--docs`` documents in shards of
``--shard-size``, methods ms_if and bm25), in a fresh temporary folder:

1. ``msif run`` materialises everything (instance in ``<tmp>/dagster_home`` with dagster_project/dagster.yaml);
2. the fine-tuned checkpoint changes (a seeded perturbation); ``dagster-daemon run`` starts on the instance
   (source sensor and automation sensor every 2 s) and runs until every asset that depends on the
   checkpoint has been re-materialised;
3. the same change once more, re-attributed by ``msif run`` in one process, for comparison.

``--code PATH``: another checkout of msif (e.g. a ``git worktree`` of an older commit) whose packages are put
first on the daemon's and msif's PYTHONPATH, to measure "before" with the same script.

One row per daemon re-attribution (bench/results/daemon_overhead.jsonl, via rows.emit): ``label``, ``commit``,
``runs``, ``wall_s`` (daemon start to the end of the last run: includes the sensors' intervals), ``run_s`` (sum
of the runs' durations from their launch, the RUN_STARTING event, to their end), ``step_s`` (sum of their steps'
durations, from STEP_SUCCESS events), ``overhead_s`` (``run_s - step_s``: process start, imports, code location
loading, a process per step where the executor starts one, Dagster's bookkeeping), per run
``per_run`` (assets, seconds, step seconds), and ``msif_run_s`` (the same re-attribution by ``msif run``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _expected(shards: list[str]) -> set[tuple[str, str | None]]:
    return {("finetune_factors", None), ("query_ihvps", None), ("score_tables", None), ("attribution_report", None),
            ("attribution_quality", None)} | {("influence_scores", s) for s in shards}


def daemon_reattribution(work: Path, env: dict, code: Path, deadline_s: float) -> dict:
    """Start the daemon on ``work``'s instance, wait for the re-attribution, return its runs' timings."""
    import dagster as dg
    from helpers.pipeline import latest_storage_id, materializations_since

    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        expected = _expected(sorted(instance.get_dynamic_partitions("corpus_shards")))
        mark = latest_storage_id(instance)
        before = {r.run_id for r in instance.get_runs()}
        log = (work / "daemon.log").open("w")
        t0 = time.time()
        daemon = subprocess.Popen([_bin("dagster-daemon"), "run", "-m", "dagster_project.definitions"], env=env,
                                  cwd=code, stdout=log, stderr=subprocess.STDOUT)
        try:
            while time.time() - t0 < deadline_s:
                time.sleep(2)
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited:\n{(work / 'daemon.log').read_text()[-3000:]}")
                runs = [r for r in instance.get_runs() if r.run_id not in before]
                if expected <= materializations_since(instance, mark) and runs and all(r.is_finished for r in runs):
                    break
            else:
                tail = (work / "daemon.log").read_text()[-3000:]
                raise SystemExit(f"no re-attribution within {deadline_s} s:\n{tail}")
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
            log.close()
        records = [r for r in instance.get_run_records() if r.dagster_run.run_id not in before]
        per_run, run_s, step_s, last_end = [], 0.0, 0.0, t0
        for rec in records:
            run = rec.dagster_run
            logs = instance.all_logs(run.run_id)
            # from the launch (RUN_STARTING: the run launcher starts the run's process, which then imports
            # and loads the code location) to the run's end
            launched = min((e.timestamp for e in logs if e.dagster_event is not None
                            and e.dagster_event.event_type == dg.DagsterEventType.RUN_STARTING),
                           default=rec.start_time or 0)
            secs = (rec.end_time or 0) - launched
            steps = sum(e.dagster_event.event_specific_data.duration_ms / 1000 for e in logs
                        if e.dagster_event is not None
                        and e.dagster_event.event_type == dg.DagsterEventType.STEP_SUCCESS)
            assets = sorted(k.to_user_string() for k in (run.asset_selection or []))
            part = run.tags.get("dagster/partition")
            per_run.append({"assets": assets, "partition": part, "status": run.status.value, "s": round(secs, 2),
                            "step_s": round(steps, 2)})
            run_s += secs
            step_s += steps
            last_end = max(last_end, rec.end_time or 0)
        return {"runs": len(records), "wall_s": round(last_end - t0, 1), "run_s": round(run_s, 1),
                "step_s": round(step_s, 1), "overhead_s": round(run_s - step_s, 1),
                "failed_runs": sum(r["status"] != "SUCCESS" for r in per_run),
                "per_run": sorted(per_run, key=lambda r: (r["assets"], r["partition"] or ""))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--label", default="after")
    ap.add_argument("--code", default=str(ROOT), help="the msif checkout the daemon and msif run import")
    ap.add_argument("--deadline-s", type=float, default=900)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "daemon_overhead.jsonl"))
    args = ap.parse_args()
    from helpers.pipeline import build_world, perturb_checkpoint
    from rows import emit

    code = Path(args.code).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="daemon_overhead_", dir=ROOT / "bench" / "out") as tmp:
        work = Path(tmp)
        toml = build_world(work, n_docs=args.docs, shard_size=args.shard_size, candidates=6, methods=("ms_if", "bm25"))
        home = work / "dagster_home"
        home.mkdir()
        shutil.copy(ROOT / "dagster_project" / "dagster.yaml", home / "dagster.yaml")
        env = dict(os.environ, DAGSTER_HOME=str(home), MSIF_CONFIG=str(toml), MSIF_DEVICE="cpu",
                   MSIF_SENSOR_INTERVAL_S="2", MSIF_AUTOMATION_INTERVAL_S="2", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        first = subprocess.run([_bin("msif"), "run", str(toml)], env=env, cwd=code, capture_output=True, text=True)
        if first.returncode != 0:
            raise SystemExit(first.stdout[-3000:] + first.stderr[-3000:])
        perturb_checkpoint(work / "ckpt" / "pretrained", work / "ckpt" / "finetuned", seed=7)
        row = daemon_reattribution(work, env, code, args.deadline_s)
        perturb_checkpoint(work / "ckpt" / "pretrained", work / "ckpt" / "finetuned", seed=8)
        t0 = time.perf_counter()
        again = subprocess.run([_bin("msif"), "run", str(toml)], env=env, cwd=code, capture_output=True, text=True)
        msif_s = time.perf_counter() - t0
        if again.returncode != 0:
            raise SystemExit(again.stdout[-3000:] + again.stderr[-3000:])
    out = {"label": args.label, "commit": commit, "docs": args.docs, "shard_size": args.shard_size, **row,
           "msif_run_s": round(msif_s, 1)}
    emit(out, args.out)
    print(json.dumps({k: v for k, v in out.items() if k != "per_run"}))
    for r in out["per_run"]:
        print(f"  {r['s']:6.1f}s (steps {r['step_s']:5.1f}s)  {', '.join(r['assets'])}"
              + (f" [{r['partition']}]" if r["partition"] else "") + f"  {r['status']}")


if __name__ == "__main__":
    main()
