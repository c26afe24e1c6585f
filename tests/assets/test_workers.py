"""``msif run --workers N``: Dagster runs at once in worker processes, the same tables as one worker.

A four-shard world through ``msif run --workers 1`` (every run in msif's process) and, in a copy of it,
``msif run --workers 2`` (two runs at once, each in a worker process) then forced again
while one partition's step kills its worker: that partition fails alone (its run marked failed in the
instance), the others complete, and the next ``msif run --workers 2`` redoes that partition (materialised
before, so only its failed attempt says it is out of date) and no other. Then the score tables are the same as
one worker's, and the instance shows runs that overlapped in time, executed by worker processes (not msif's).
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
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """One world through one worker; a copy through two workers, then forced again while the step of one
    (already materialised) partition kills its worker process, then ``msif run --workers 2`` again."""
    one = tmp_path_factory.mktemp("one_worker")
    build_world(one, n_docs=48, shard_size=12, candidates=4, methods=METHODS)
    two = tmp_path_factory.mktemp("two_workers")
    shutil.copytree(one, two, dirs_exist_ok=True)
    r1 = _msif(one / "experiment.toml", "--workers", "1")
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _msif(two / "experiment.toml", "--workers", "2")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    with _instance(two) as inst:
        before = latest_storage_id(inst)
    # every partition recomputed; the worker executing shard_00002's scores dies in its step
    crashed = _msif(two / "experiment.toml", "--workers", "2", "--force",
                    env={"MSIF_FAULT": "influence_scores[shard_00002]"})
    with _instance(two) as inst:
        mark = latest_storage_id(inst)
        failed = inst.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        done = materializations_since(inst, before)
    again = _msif(two / "experiment.toml", "--workers", "2")
    with _instance(two) as inst:
        redone = materializations_since(inst, mark)
    return one, two, {"crashed": crashed, "failed": failed, "done": done, "again": again, "redone": redone}


def test_a_dead_worker_fails_its_partition_only(worlds) -> None:
    _, _, r = worlds
    crashed, again, done, redone = r["crashed"], r["again"], r["done"], r["redone"]
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    assert "FAIL influence_scores [shard_00002]" in crashed.stdout and "worker process died" in crashed.stdout, \
        crashed.stdout
    assert "FAIL" not in crashed.stdout.replace("FAIL influence_scores [shard_00002]", ""), crashed.stdout
    assert [x.tags.get("dagster/partition") for x in r["failed"]] == ["shard_00002"]  # marked failed
    assert ("influence_scores", "shard_00002") not in done
    assert {("influence_scores", s) for s in SHARDS if s != "shard_00002"} <= done
    assert again.returncode == 0, again.stdout + again.stderr
    assert ("influence_scores", "shard_00002") in redone
    assert not {(a, p) for a, p in redone if p is not None and p != "shard_00002"}, redone


def test_two_workers_give_the_same_tables(worlds) -> None:
    one, two, _ = worlds
    a, b = _tables(one), _tables(two)
    assert set(a.shard) == set(SHARDS) and len(a) == len(b)
    pd.testing.assert_frame_equal(a, b)


def test_runs_overlapped_in_two_worker_processes(worlds) -> None:
    _, two, _ = worlds
    with _instance(two) as inst:
        recs = inst.get_run_records()
        assert {r.dagster_run.tags.get("msif/driver") for r in recs} == {"msif run --workers 2"}
        spans = sorted((r.start_time, r.end_time) for r in recs)
        overlaps = sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
        assert overlaps > 0, spans
        run_pids = {e.dagster_event.pid for r in recs for e in inst.all_logs(r.dagster_run.run_id)
                    if e.dagster_event is not None and e.dagster_event.event_type == dg.DagsterEventType.STEP_START}
    msif_pid = json.loads((two / "lakehouse" / ".msif.lock").read_text())["pid"]  # the run that held the lakehouse
    assert len(run_pids) >= 2 and msif_pid not in run_pids, (run_pids, msif_pid)  # worker processes (one replaced)


POOL_TOY = '''
import json
import pathlib
import time
import dagster as dg
from msif_assets.assets.base import POOL, pool_turn

def _step(context, name):
    with pool_turn(context):  # what msif's heavy steps hold besides Dagster's claim (run_step)
        t = time.time()
        time.sleep(1.5)
        (pathlib.Path(__file__).parent / f"{name}.json").write_text(json.dumps([t, time.time()]))

@dg.asset(pool=POOL)
def a(context):
    _step(context, "a")

@dg.asset(pool=POOL)
def b(context):
    _step(context, "b")

def toy_job(name):
    defs = dg.Definitions(assets=[a, b], jobs=[dg.define_asset_job(name, selection=[name])],
                          executor=dg.in_process_executor)
    return defs.resolve_job_def(name)

def run(home, folder, name):
    inst = dg.DagsterInstance.from_config(home)
    job = dg.build_reconstructable_job("pool_toy", "toy_job", reconstructable_args=(name,),
                                       reconstructor_working_directory=folder)
    assert dg.execute_job(job, inst).success
'''


def test_the_accelerator_pool_caps_steps_across_worker_processes(tmp_path: Path) -> None:
    """What keeps the runs of `--workers N` off one GPU at once: with dagster_project/dagster.yaml's pool limit
    of 1, two runs executed by execute_job in two processes never run their pool steps together. (Dagster's
    claim alone let them overlap about one time in four on this SQLite instance: msif's steps also hold a
    slot file, base.pool_turn.)"""
    import multiprocessing

    (tmp_path / "pool_toy.py").write_text(POOL_TOY)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "dagster_project" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)):  # create the instance's databases once, before two processes do
        pass
    sys.path.insert(0, str(tmp_path))  # the spawned processes import the toy module from there too
    try:
        import pool_toy

        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=pool_toy.run, args=(str(home), str(tmp_path), n)) for n in ("a", "b")]
        for p in procs:
            p.start()
    finally:
        sys.path.remove(str(tmp_path))
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    spans = sorted(json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b"))
    assert spans[1][0] >= spans[0][1], spans  # the second step started after the first ended


def test_pool_slots_admit_as_many_holders_as_the_limit(tmp_path: Path) -> None:
    """With a limit of 2, two holders get slots 0 and 1 and a third waits until one of them is given back."""
    import threading

    from msif_assets.lock import pool_slot

    events: list[str] = []
    waited = threading.Event()

    def third() -> None:
        with pool_slot(tmp_path, "p", 2, on_wait=lambda m: waited.set(), poll_s=0.01) as i:
            events.append(f"third got {i}")

    with pool_slot(tmp_path, "p", 2) as first, pool_slot(tmp_path, "p", 2) as second:
        assert (first, second) == (0, 1)
        t = threading.Thread(target=third)
        t.start()
        assert waited.wait(5)
        events.append("released")
    t.join(5)
    assert events == ["released", "third got 1"] or events == ["released", "third got 0"]
