"""Run the asset graph in-process: what ``msif run`` does, and what the tests drive.

:class:`Pipeline` holds the definitions, a Dagster instance and the experiment. ``update()`` is the
incremental loop a deployment's daemon would run, made synchronous:

1. observe the sources (content hashes), sync the shard partitions, record new data versions;
2. evaluate the automation conditions (``dg.evaluate_automation_conditions``), add every missing
   asset partition, and everything downstream of what they request — what the eager conditions would
   request at the following ticks, one level per tick, is run in this one pass;
3. execute that, in dependency order, one in-process run per (partition, group of assets) — assets of
   one partition that depend on each other share a run;
4. evaluate again, to consume the updates step 3 made (and to run whatever they still request) until
   nothing is requested: usually one more tick. The automation cursor is kept in the instance, so a later
   ``msif run`` sees what changed since this one.

The sources are synced once, before step 2, and nothing else adds or removes partitions, so an update
reads each dynamic partitions definition's keys once (:func:`_partition_keys_read_once`): Dagster's
evaluation would otherwise query the instance for them thousands of times a tick.

``materialize_all()`` forces every asset partition (``msif run --force``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import dagster as dg

from .config import ExperimentConfig
from .sources import SyncReport, sync_sources

log = logging.getLogger(__name__)

Unit = tuple[dg.AssetKey, str | None]  # (asset, partition key or None)
_CURSOR = "msif/automation_cursor"


@dataclass
class RunRecord:
    """One in-process Dagster run."""

    partition: str | None
    assets: list[str]
    success: bool
    seconds: float
    run_id: str
    error: str | None = None
    step_seconds: float = 0.0  # time inside the steps (asset code, checks); the rest is Dagster's own
    failed_assets: list[str] = field(default_factory=list)  # the assets of the run that did not materialise
    errors_in: list[str] = field(default_factory=list)  # the assets whose own step raised (the root causes)


@dataclass
class UpdateResult:
    """What one ``update()`` / ``materialize_all()`` did."""

    sync: SyncReport | None = None
    runs: list[RunRecord] = field(default_factory=list)
    ticks: int = 0
    seconds: float = 0.0
    stale: dict[tuple[str, str | None], str] = field(default_factory=dict)  # outputs deleted/altered -> why
    skipped: list[tuple[str, str | None]] = field(default_factory=list)  # downstream of a failure, not run

    @property
    def materialized(self) -> set[tuple[str, str | None]]:
        """(asset, partition) pairs materialised successfully."""
        return {(a, r.partition) for r in self.runs for a in r.assets if a not in r.failed_assets}

    @property
    def failures(self) -> list[RunRecord]:
        """Failed runs."""
        return [r for r in self.runs if not r.success]


@dataclass
class _Finished:
    """What :meth:`Pipeline._record` reads of a run executed in a worker process (from the instance)."""

    run_id: str
    success: bool
    all_events: list


@contextmanager
def _partition_keys_read_once(instance: dg.DagsterInstance) -> Iterator[None]:
    """Within the block, each dynamic partitions definition's keys are read from ``instance`` once and then
    served from memory (to Dagster's automation evaluation, to this module, to in-process asset code). Only
    for a stretch in which nothing adds or deletes a partition: :meth:`Pipeline.update` after its sync."""
    if "get_dynamic_partitions" in vars(instance):  # already inside such a block
        yield
        return
    read = instance.get_dynamic_partitions
    keys: dict[str, list[str]] = {}

    def get_dynamic_partitions(partitions_def_name: str) -> list[str]:
        if partitions_def_name not in keys:
            keys[partitions_def_name] = list(read(partitions_def_name))
        return list(keys[partitions_def_name])

    instance.get_dynamic_partitions = get_dynamic_partitions  # type: ignore[method-assign]
    try:
        yield
    finally:
        del instance.get_dynamic_partitions


def _root_cause(error) -> str:
    """The message of the user code's own exception, under Dagster's wrappers."""
    while (error.cls_name or "").startswith("Dagster") and getattr(error, "cause", None) is not None:
        error = error.cause
    return error.message.strip()


class Pipeline:
    """The asset graph of one experiment bound to a Dagster instance."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance, cfg: ExperimentConfig,
                 echo: Callable[[str], None] | None = None, log_level: str = "WARNING", workers: int = 1) -> None:
        """``workers`` > 1: that many runs at once, each in a worker process (:mod:`.jobs`; the experiment
        must come from a file, which each worker reads again; the instance must be on disk)."""
        self.defs, self.instance, self.cfg = defs, instance, cfg
        self.workers = max(1, int(workers))
        self.echo = echo or (lambda s: log.info(s))
        self.graph = defs.resolve_asset_graph()
        self._run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
        self.assets = {a.key: a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.is_materializable}
        self.checks = [c for c in (defs.asset_checks or [])]
        self.resources = defs.resources or {}
        self._order = self._topological_order()
        self._rank = {k: i for i, k in enumerate(self._order)}
        self._job_kwargs = self._reconstruction() if self.workers > 1 else None

    def _reconstruction(self) -> dict:
        """What the worker processes rebuild each run's job from (:mod:`msif_assets.jobs`), with this
        pipeline's resources; torch threads shared out between the workers."""
        import os

        from .jobs import job_kwargs

        if self.instance.is_ephemeral:
            raise ValueError("parallel runs (workers > 1) need a Dagster instance on disk (DAGSTER_HOME or "
                             "DagsterInstance.local_temp), not an ephemeral one: each worker process records its "
                             "runs' events there")
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        return job_kwargs(self.cfg, self.resources["device"], self.resources["embedder"], threads)

    # ---------------------------------------------------------------------------------- graph helpers
    def _topological_order(self) -> list[dg.AssetKey]:
        order: list[dg.AssetKey] = []
        seen: set[dg.AssetKey] = set()

        def visit(k: dg.AssetKey) -> None:
            if k in seen:
                return
            seen.add(k)
            for p in self.graph.get(k).parent_keys:
                if p in self.assets:
                    visit(p)
            order.append(k)

        for k in sorted(self.assets, key=lambda k: k.to_user_string()):
            visit(k)
        return order

    def partitions_of(self, key: dg.AssetKey) -> list[str | None]:
        """Current partition keys of an asset ([None] if unpartitioned)."""
        pdef = self.assets[key].partitions_def
        if pdef is None:
            return [None]
        return sorted(self.instance.get_dynamic_partitions(pdef.name))

    def _pdef_name(self, key: dg.AssetKey) -> str | None:
        pdef = self.assets[key].partitions_def
        return None if pdef is None else pdef.name

    def upstream_units(self, unit: Unit) -> set[Unit]:
        """Materialisable upstream (asset, partition) units of ``unit``."""
        key, part = unit
        out: set[Unit] = set()
        for p in self.graph.get(key).parent_keys:
            if p not in self.assets:
                continue
            pparts = self.partitions_of(p)
            if pparts == [None]:
                out.add((p, None))
            elif part is None:
                out |= {(p, q) for q in pparts}
            else:  # identity mapping between shard partitions
                out |= {(p, part)} if part in pparts else set()
        return out

    def downstream_units(self, units: Iterable[Unit]) -> set[Unit]:
        """Every (asset, partition) unit downstream of ``units``, at all levels."""
        start = set(units)
        out: set[Unit] = set()
        frontier = set(start)
        while frontier:
            key, part = frontier.pop()
            for c in self.graph.get(key).child_keys:
                if c not in self.assets:
                    continue
                cparts = self.partitions_of(c)
                if cparts == [None]:
                    kids = {(c, None)}
                elif part is None:
                    kids = {(c, q) for q in cparts}
                else:
                    kids = {(c, part)} if part in cparts else set()
                new = kids - out - start
                out |= new
                frontier |= new
        return out

    def stale_outputs(self) -> dict[Unit, str]:
        """Units whose latest materialisation's files were deleted or altered since (:mod:`.outputs`)."""
        from .outputs import lakehouse_problems

        return lakehouse_problems(self.instance, self.cfg, {k.to_user_string() for k in self.assets})

    def _report_skipped(self, res: UpdateResult, skipped: set[Unit]) -> None:
        if not skipped:
            return
        rank = {k: i for i, k in enumerate(self._order)}
        units = sorted(skipped, key=lambda u: (rank[u[0]], u[1] or ""))
        res.skipped = [(k.to_user_string(), p) for k, p in units]
        self.echo(f"  skipped {len(units)} step(s) downstream of the failure: "
                  + ", ".join(f"{k.to_user_string()}{f' [{p}]' if p else ''}" for k, p in units))

    def all_units(self) -> list[Unit]:
        """Every (asset, partition) of the graph."""
        return [(k, p) for k in self._order for p in self.partitions_of(k)]

    def missing_units(self) -> set[Unit]:
        """Asset partitions never materialised."""
        out: set[Unit] = set()
        for k in self._order:
            parts = self.partitions_of(k)
            if parts == [None]:
                if self.instance.get_latest_materialization_event(k) is None:
                    out.add((k, None))
            else:
                have = self.instance.get_materialized_partitions(k)
                out |= {(k, p) for p in parts if p not in have}
        return out

    def failed_units(self) -> set[Unit]:
        """Asset partitions whose latest attempt did not materialise them (its run failed, or died) although
        they were materialised before: what an update retries, since the automation conditions saw their
        upstream change already."""
        out: set[Unit] = set()
        for k in self._order:
            for p in self.partitions_of(k):
                planned = self.instance.get_latest_planned_materialization_info(k, p)
                if planned is None:
                    continue
                recs = self.instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=k, asset_partitions=[p] if p is not None else None), limit=1)
                last = recs.records[0].storage_id if recs.records else -1
                if planned.storage_id > last:
                    run = self.instance.get_run_by_id(planned.run_id)
                    if run is None or run.is_finished:
                        out.add((k, p))
        return out

    # ---------------------------------------------------------------------------------- execution
    def _next_group(self, pending: set[Unit], busy: set[Unit]) -> set[Unit] | None:
        """The next run: the first ready unit (nothing it needs is pending or running) and the units of its
        partition whose pending upstream is all in the group; None when nothing is ready."""
        rank = self._rank
        ready = [u for u in pending if not (self.upstream_units(u) & (pending | busy))]
        if not ready:
            return None
        ready.sort(key=lambda u: (rank[u[0]], u[1] or ""))
        first = ready[0]
        group_def, part = self._pdef_name(first[0]), first[1]
        group = {first}
        grew = True
        while grew:  # add same-partition units whose pending upstream is all in the group
            grew = False
            for u in sorted(pending - group, key=lambda u: rank[u[0]]):
                if u[1] == part and self._pdef_name(u[0]) == group_def and \
                        (self.upstream_units(u) & (pending | busy)) <= group:
                    group.add(u)
                    grew = True
        return group

    def execute(self, units: Iterable[Unit], skipped: set[Unit] | None = None) -> list[RunRecord]:
        """Materialise ``units`` in dependency order, one Dagster run per (partition, group of assets); a
        failed unit's downstream units are skipped (added to ``skipped``). With ``workers`` > 1 up to that
        many runs are in flight at once, each in a worker process of its own (:meth:`_submit`).

        Why a loop of ours decides which run starts when: Dagster runs one partition per run, and its own
        scheduling of many runs (the run queue and its coordinator, asset backfills) is done by the daemon;
        without a daemon it has no public way to launch runs. A deployment uses the daemon (README,
        ``deploy/``), and then this loop is not involved."""
        pending = set(units)
        records: list[RunRecord] = []
        skipped = skipped if skipped is not None else set()
        running: dict[Future, tuple[set[Unit], str | None, list[dg.AssetKey]]] = {}
        busy: set[Unit] = set()
        pool = None
        if self.workers > 1:
            from .jobs import WorkerPool

            pool = WorkerPool(self.workers, self.instance)
        try:
            while pending or running:
                while len(running) < self.workers and (pool is None or pool.idle()):
                    group = self._next_group(pending, busy)
                    if group is None:
                        break
                    pending -= group  # never downstream of a failure: those were taken out of ``pending``
                    busy |= group
                    part = next(iter(group))[1]
                    keys = [k for k, _ in sorted(group, key=lambda u: self._rank[u[0]])]
                    if pool is None:
                        fut: Future = Future()
                        fut.set_result(self._run(keys, part))
                    else:
                        fut = self._submit(pool, keys, part)
                    running[fut] = (group, part, keys)
                if not running:  # pragma: no cover - a cycle cannot happen in an asset graph
                    raise RuntimeError(f"cannot order {pending}")
                if pool is not None and not any(f.done() for f in running):
                    pool.wait()
                done = [f for f in running if f.done()]
                for fut in sorted(done, key=lambda f: min(self._rank[u[0]] for u in running[f][0])):
                    group, part, keys = running.pop(fut)
                    busy -= group
                    rec = fut.result() if pool is None else self._finished(fut, keys, part)
                    records.append(rec)
                    if rec.failed_assets:
                        bad = {(dg.AssetKey(a), part) for a in rec.failed_assets}
                        blocked = self.downstream_units(bad) & pending  # all levels, never run on missing inputs
                        skipped |= blocked | (bad - {(dg.AssetKey(a), part) for a in rec.errors_in})
                        pending -= blocked
        finally:
            if pool is not None:
                pool.close()
        return records

    def _run(self, keys: list[dg.AssetKey], partition: str | None) -> RunRecord:
        """One in-process run of ``keys`` (and their checks) for ``partition``."""
        key_set = set(keys)
        checks = [c for c in self.checks if {ck.asset_key for ck in c.check_keys} <= key_set]
        t0 = time.perf_counter()
        result = dg.materialize(
            [self.assets[k] for k in keys] + checks, instance=self.instance, partition_key=partition,
            resources=self.resources, raise_on_error=False,
            run_config=self._run_config, tags={"msif/driver": "msif run"})
        return self._record(keys, partition, result, time.perf_counter() - t0)

    def _submit(self, pool, keys: list[dg.AssetKey], partition: str | None) -> Future:
        """Start one run of ``keys`` (and their checks) for ``partition`` in a worker process
        (:mod:`msif_assets.jobs`); its steps work under this process's lakehouse lock when it holds it."""
        import uuid

        from .jobs import TASK_TAG
        from .lock import HOLDER_TAG, held_here, holder_tag

        tags = {"msif/driver": f"msif run --workers {self.workers}"}
        if held_here(self.cfg.root):  # msif run holds the lakehouse: its runs' steps work under its lock
            tags[HOLDER_TAG] = holder_tag(self.cfg.root)
        if partition is not None:
            tags["dagster/partition"] = partition
        tags[TASK_TAG] = uuid.uuid4().hex
        fut = pool.submit({"kwargs": self._job_kwargs, "instance_ref": self.instance.get_ref(),
                           "keys": [k.to_user_string() for k in keys], "tags": tags, "run_config": self._run_config})
        fut.started = time.perf_counter()  # type: ignore[attr-defined]
        return fut

    def _finished(self, fut: Future, keys: list[dg.AssetKey], partition: str | None) -> RunRecord:
        """The record of a worker's run, read back from the instance; a worker that died is a failed run."""
        secs = time.perf_counter() - fut.started  # type: ignore[attr-defined]
        try:
            run_id = fut.result()
        except RuntimeError as e:  # the worker process died, or could not execute the run
            from .jobs import TASK_TAG

            runs = self.instance.get_runs(filters=dg.RunsFilter(tags={TASK_TAG: fut.task_id}))  # type: ignore
            events = [x.dagster_event for x in self.instance.all_logs(runs[0].run_id)
                      if x.dagster_event is not None] if runs else []
            started = {x.step_key for x in events if x.event_type == dg.DagsterEventType.STEP_START}
            ended = {x.step_key for x in events if x.event_type == dg.DagsterEventType.STEP_SUCCESS}
            return self._record(keys, partition, _Finished(runs[0].run_id if runs else "", False, events), secs,
                                error=str(e), errored=started - ended)
        run = self.instance.get_run_by_id(run_id)
        events = [e.dagster_event for e in self.instance.all_logs(run_id) if e.dagster_event is not None]
        finished = _Finished(run_id, run is not None and run.status == dg.DagsterRunStatus.SUCCESS, events)
        return self._record(keys, partition, finished, secs)

    def _record(self, keys: list[dg.AssetKey], partition: str | None, result, secs: float,
                error: str | None = None, errored: set[str] | None = None) -> RunRecord:
        """The :class:`RunRecord` of a finished run (its line echoed); ``error`` and ``errored`` (the steps at
        fault) for a run whose worker died, which leaves no failure events."""
        names = [k.to_user_string() for k in keys]
        err = None
        done = {e.asset_key.to_user_string() for e in result.all_events
                if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION and e.asset_key is not None}
        failed = [n for n in names if n not in done] if not result.success else []
        if errored is None:
            errored = {e.step_key for e in result.all_events if e.is_step_failure}
        if not result.success:
            msgs = [_root_cause(e.event_specific_data.error) for e in result.all_events
                    if e.is_step_failure and e.event_specific_data and e.event_specific_data.error]
            err = error or " | ".join(msgs) or "run failed"
            failed = failed or names
        step_s = sum(e.event_specific_data.duration_ms / 1000 for e in result.all_events
                     if e.event_type == dg.DagsterEventType.STEP_SUCCESS and e.event_specific_data)
        where = f" [{partition}]" if partition else ""
        if result.success:
            line = f"  ok   {', '.join(names)}{where} ({secs:.1f}s)"
        else:
            ok = [n for n in names if n not in failed]
            root = [n for n in failed if n in errored] or failed
            line = (f"  FAIL {', '.join(root)}{where} ({secs:.1f}s)" + (f"; ok: {', '.join(ok)}" if ok else "")
                    + f"\n       {err}")
        self.echo(line)
        return RunRecord(partition, names, result.success, secs, result.run_id, err, step_s, failed,
                         [n for n in failed if n in errored] or failed)

    # ---------------------------------------------------------------------------------- automation
    def _load_cursor(self):
        raw = self.instance.run_storage.get_cursor_values({_CURSOR}).get(_CURSOR)
        if not raw:
            return None
        try:
            return dg.deserialize_value(raw)
        except Exception:  # noqa: BLE001 - an unreadable cursor only costs one extra evaluation
            return None

    def _save_cursor(self, cursor) -> None:
        self.instance.run_storage.set_cursor_values({_CURSOR: dg.serialize_value(cursor)})

    def evaluate(self) -> set[Unit]:
        """One automation tick: the (asset, partition) units the conditions request now."""
        r = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self._load_cursor())
        self._save_cursor(r.cursor)
        return {(k, p) for k in self.assets for p in r.get_requested_partitions(k)}

    def sync(self) -> SyncReport:
        """Observe the sources and record what changed (see :func:`msif_assets.sources.sync_sources`)."""
        return sync_sources(self.instance, self.cfg)

    def update(self, max_ticks: int = 40, include_missing: bool = True) -> UpdateResult:
        """Bring every asset up to date with its sources: the automation loop, synchronously. Units whose
        outputs were deleted or altered, and units whose last attempt failed, are recomputed too; nothing
        downstream of a failure runs."""
        t0 = time.perf_counter()
        res = UpdateResult(sync=self.sync())
        self.echo(f"sources: {res.sync.summary()}")
        stale = self.stale_outputs()
        for (k, p), why in sorted(stale.items(), key=lambda kv: (kv[0][0].to_user_string(), kv[0][1] or "")):
            self.echo(f"  stale {k.to_user_string()}{f' [{p}]' if p else ''}: {why}; recomputing it")
            res.stale[(k.to_user_string(), p)] = why
        failed: set[Unit] = set()
        skipped: set[Unit] = set()
        with _partition_keys_read_once(self.instance):
            for tick in range(max_ticks):
                res.ticks += 1
                want = self.evaluate()
                if include_missing:
                    want |= self.missing_units()
                if tick == 0:
                    want |= set(stale) | self.failed_units()
                want |= self.downstream_units(want)  # the later ticks' requests, run now
                blocked = self.downstream_units(failed)
                skipped |= want & blocked
                want -= failed | blocked
                if not want:
                    break
                recs = self.execute(want, skipped)
                res.runs += recs
                failed |= {(dg.AssetKey(a), r.partition) for r in recs for a in r.failed_assets}
        done = {(dg.AssetKey(a), p) for a, p in res.materialized}
        roots = {(dg.AssetKey(a), r.partition) for r in res.runs for a in r.errors_in}
        # everything downstream of a failure is out of date now, whether this update asked for it or not
        self._report_skipped(res, (skipped | self.downstream_units(roots)) - roots - done)
        res.seconds = time.perf_counter() - t0
        return res

    def materialize_all(self) -> UpdateResult:
        """Observe the sources, then materialise every asset partition (``msif run --force``)."""
        t0 = time.perf_counter()
        res = UpdateResult(sync=self.sync())
        self.echo(f"sources: {res.sync.summary()}")
        skipped: set[Unit] = set()
        with _partition_keys_read_once(self.instance):
            self.evaluate()  # start the automation cursor, so later updates compare against this state
            res.runs = self.execute(self.all_units(), skipped)
            roots = {(dg.AssetKey(a), r.partition) for r in res.runs for a in r.errors_in}
            done = {(dg.AssetKey(a), p) for a, p in res.materialized}
            self._report_skipped(res, (skipped | self.downstream_units(roots)) - roots - done)
            self.evaluate()  # consume the updates this run made (they are not changes to react to)
        res.seconds = time.perf_counter() - t0
        return res
