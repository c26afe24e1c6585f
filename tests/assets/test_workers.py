"""``msif run --workers N``: runs at once on Dagster's multiprocess executor, the same tables as one worker.

A four-shard world through ``msif run --workers 1`` (every run in msif's process) and, in a copy of it,
``msif run --workers 2`` (two runs at once, each in a worker process): the score tables are the
same, the instance shows runs that overlapped in time, executed by two worker processes (not msif's), and a
worker that dies fails its own partition only; the next run redoes that partition and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from helpers.pipeline import build_world, latest_storage_id, materializations_since

SHARDS = [f"shard_{i:05d}" for i in range(4)]
METHODS = ("ms_if", "bm25")


def _msif(toml: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MSIF_DEVICE="cpu", PYTHONUNBUFFERED="1", **(env or {}))
    env.pop("DAGSTER_HOME", None)
    return subprocess.run([str(Path(sys.executable).with_name("msif")), "run", str(toml), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def _tables(root: Path) -> pd.DataFrame:
    files = sorted((root / "lakehouse" / "tables" / "influence_scores").glob("*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return df.sort_values(["query_id", "method", "doc_id"]).reset_index(drop=True)


def _instance(root: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.local_temp(tempdir=str(root / "lakehouse" / ".dagster"))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    one = tmp_path_factory.mktemp("one_worker")
    build_world(one, n_docs=64, shard_size=16, candidates=6, methods=METHODS)
    two = tmp_path_factory.mktemp("two_workers")
    shutil.copytree(one, two, dirs_exist_ok=True)
    r1 = _msif(one / "experiment.toml", "--workers", "1")
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _msif(two / "experiment.toml", "--workers", "2")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    return one, two


def test_two_workers_give_the_same_tables(worlds) -> None:
    one, two = worlds
    a, b = _tables(one), _tables(two)
    assert set(a.shard) == set(SHARDS) and len(a) == len(b)
    pd.testing.assert_frame_equal(a.drop(columns=["score", "score_mlp", "score_mha"], errors="ignore"),
                                  b.drop(columns=["score", "score_mlp", "score_mha"], errors="ignore"))
    # one thread per step with two workers, two threads in msif's process: sums may round differently
    for col in [c for c in ("score", "score_mlp", "score_mha") if c in a]:
        pd.testing.assert_series_equal(a[col], b[col], check_exact=False, rtol=1e-5, atol=1e-9)


def test_runs_overlapped_in_two_worker_processes(worlds) -> None:
    _, two = worlds
    with _instance(two) as inst:
        recs = inst.get_run_records()
        assert recs and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in recs)
        assert {r.dagster_run.tags.get("msif/driver") for r in recs} == {"msif run --workers 2"}
        spans = sorted((r.start_time, r.end_time) for r in recs)
        overlaps = sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
        assert overlaps > 0, spans
        run_pids = {e.dagster_event.pid for r in recs for e in inst.all_logs(r.dagster_run.run_id)
                    if e.dagster_event is not None and e.dagster_event.event_type == dg.DagsterEventType.STEP_START}
    msif_pid = json.loads((two / "lakehouse" / ".msif.lock").read_text())["pid"]  # the run that held the lakehouse
    assert len(run_pids) == 2 and msif_pid not in run_pids, (run_pids, msif_pid)  # two worker processes


def test_a_dead_worker_fails_its_partition_only(worlds) -> None:
    _, two = worlds
    toml = two / "experiment.toml"
    with _instance(two) as inst:
        mark = latest_storage_id(inst)
    r = _msif(toml, "--workers", "2", "--force", env={"MSIF_FAULT": "influence_scores[shard_00002]"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL influence_scores [shard_00002]" in r.stdout, r.stdout
    with _instance(two) as inst:
        done = materializations_since(inst, mark)
    assert ("influence_scores", "shard_00002") not in done
    assert {("influence_scores", s) for s in SHARDS if s != "shard_00002"} <= done
    with _instance(two) as inst:
        mark = latest_storage_id(inst)
    again = _msif(toml, "--workers", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    with _instance(two) as inst:
        redone = materializations_since(inst, mark)
    assert ("influence_scores", "shard_00002") in redone
    assert not {(a, p) for a, p in redone if p is not None and p != "shard_00002"}, redone
