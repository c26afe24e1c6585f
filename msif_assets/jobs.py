"""Runs in worker processes: what lets ``msif run --workers N`` execute N Dagster runs at once
(:class:`WorkerPool`), each with ``dagster.execute_job`` on the same instance, in a process of its own.

Why worker processes and not threads: two Dagster runs executed from two threads of one process deadlock in
Python's logging (each run's start reconfigures the logging handlers the other is writing through). Why
long-lived workers running Dagster's in-process executor and not its multiprocess executor (a process per
step): a step process loads the models and the embedder again for every step (measured on a four-shard
world: 4-5 s of each corpus step, the whole run 4x slower than one worker), where a worker keeps them for its
next runs; a worker that dies fails its own run only.

``execute_job`` needs a *reconstructable* job: the worker builds it with :func:`experiment_job` from plain
strings and numbers (recorded in the run): it reads the experiment file again
(:func:`msif_assets.config.reload_config`), builds the same definitions, resources included, and an asset job
of the run's assets (they share a partitions definition; the implicit job of all assets cannot be rebuilt
this way, its name is reserved). The forkserver start method with :data:`PRELOAD` imported once in the server
makes a worker cost a fork, not a fresh interpreter importing torch and transformers.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from .config import ExperimentConfig
from .lock import HOLDER_TAG

PRELOAD = ["torch", "transformers", "pandas", "pyarrow", "dagster", "msif_core.api", "msif_assets.build"]


class NotReconstructable(ValueError):
    """The experiment was built in code, so another process cannot rebuild it."""


def job_kwargs(cfg: ExperimentConfig, device: Any, embedder: Any, threads: int = 0) -> dict[str, Any]:
    """The arguments :func:`experiment_job` rebuilds ``cfg``'s jobs from, in another process: the experiment
    file, the device resource's settings (``threads``: torch threads per worker, 0 = the resource's own) and
    the embedder's model. A :class:`NotReconstructable` error when ``cfg`` came from no file."""
    if cfg.origin is None:
        raise NotReconstructable(
            "parallel runs (workers > 1) rebuild the experiment in each worker process from its file, but this "
            "experiment was built in code (ExperimentConfig(...)); load it with msif_assets.config.load_config, "
            "or run with workers = 1")
    return {"toml": cfg.origin[0], "base_dir": cfg.origin[1], "is_demo": cfg.is_demo,
            "device": device.device, "dtype": device.dtype,
            "torch_threads": int(threads or device.torch_threads),
            "retain_freed_memory": bool(device.retain_freed_memory), "embedder": embedder.model}


RUN_JOB = "msif_run"  # the job of one run: the group of assets (of one partitions definition) it materialises


def experiment_job(toml: str, base_dir: str, is_demo: bool, device: str, dtype: str, torch_threads: int,
                   retain_freed_memory: bool, embedder: str, keys: list[str]) -> dg.JobDefinition:
    """The job materialising the assets ``keys`` (and their checks) of the experiment file ``toml`` (paths
    relative to ``base_dir``) with these resources (:func:`msif_assets.build.build_definitions`): one run's
    job. ``keys`` share a partitions definition, as the runs of :class:`msif_assets.runner.Pipeline` do."""
    import warnings

    from .build import build_definitions
    from .config import reload_config
    from .resources import DeviceResource, EmbedderResource

    warnings.filterwarnings("ignore", category=dg.BetaWarning)  # observable_source_asset, in every worker
    cfg = reload_config((toml, base_dir), is_demo=is_demo)
    defs = build_definitions(cfg, DeviceResource(device=device, dtype=dtype, torch_threads=torch_threads,
                                                 retain_freed_memory=retain_freed_memory),
                             EmbedderResource(model=embedder))
    job = dg.define_asset_job(RUN_JOB, selection=dg.AssetSelection.assets(*(dg.AssetKey.from_user_string(k)
                                                                            for k in keys)))
    return dg.Definitions.merge(defs, dg.Definitions(jobs=[job])).resolve_job_def(RUN_JOB)


def reconstructable_job(kwargs: dict[str, Any], keys: list[str]) -> dg.ReconstructableJob:
    """:func:`experiment_job` of ``keys`` (``kwargs`` from :func:`job_kwargs`) as ``execute_job`` needs it."""
    return dg.build_reconstructable_job(__name__, experiment_job.__name__,
                                        reconstructable_kwargs={**kwargs, "keys": list(keys)},
                                        reconstructor_working_directory=os.getcwd())


TASK_TAG = "msif/task"  # a run's task id in the worker pool: how a run whose worker died is found


class WorkerPool:
    """``n`` worker processes, each executing one Dagster run at a time (:func:`execute_in_worker`), forked
    from a server that imported :data:`PRELOAD` once. A worker keeps what its runs loaded (models, the
    embedder: the resources' per-process caches) for its next runs. A worker that dies (out of memory, a
    crash in native code) fails its own run only: its Dagster run is marked failed and a new worker takes
    its place."""

    def __init__(self, n: int, instance: dg.DagsterInstance) -> None:
        import multiprocessing

        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.instance = instance
        self.workers: list[list] = [self._spawn() for _ in range(n)]  # [process, connection, future or None]

    def _spawn(self) -> list:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child,), daemon=True, name="msif-worker")
        proc.start()
        child.close()
        return [proc, parent, None]

    def idle(self) -> int:
        """Workers without a run (a worker that died while idle is replaced first)."""
        for i, w in enumerate(self.workers):
            if w[2] is None and not w[0].is_alive():
                w[1].close()
                self.workers[i] = self._spawn()
        return sum(w[2] is None for w in self.workers)

    def submit(self, task: dict[str, Any]):
        """Give ``task`` (the arguments of :func:`execute_in_worker`) to an idle worker; a Future of its run id."""
        from concurrent.futures import Future

        fut: Future = Future()
        fut.task_id = task["tags"][TASK_TAG]  # type: ignore[attr-defined]
        for attempt in range(2):
            i, worker = next((i, w) for i, w in enumerate(self.workers) if w[2] is None)
            try:
                worker[1].send(task)
            except OSError:  # it died since idle() looked: replace it and try once more
                self.workers[i] = self._spawn()
                if attempt:
                    raise
                continue
            worker[2] = fut
            return fut
        raise AssertionError("unreachable")  # pragma: no cover

    def wait(self) -> None:
        """Block until at least one worker's run has ended; settle its future (a run id, or the error of a
        worker that died or could not execute the run: its run, if it started one, is marked failed)."""
        from multiprocessing.connection import wait

        busy = [w for w in self.workers if w[2] is not None]
        ready = set(wait([w[1] for w in busy] + [w[0].sentinel for w in busy]))
        for i, w in enumerate(self.workers):
            proc, conn, fut = w
            if fut is None or not (conn in ready or proc.sentinel in ready):
                continue
            w[2] = None
            kind, value = "died", None
            if conn in ready:
                try:
                    kind, value = conn.recv()
                except EOFError:
                    pass
            if kind == "ok":
                fut.set_result(value)
                continue
            if kind == "error":
                self._fail_runs_of(fut.task_id, f"the msif worker could not execute this run: {value}")  # type: ignore[attr-defined]
                fut.set_exception(RuntimeError(value))
                continue
            proc.join(timeout=5)
            why = f"the worker process died (exit code {proc.exitcode})"
            self._fail_runs_of(fut.task_id, f"{why} while it executed this run")  # type: ignore[attr-defined]
            fut.set_exception(RuntimeError(why))
            conn.close()
            self.workers[i] = self._spawn()

    def _fail_runs_of(self, task_id: str, message: str) -> None:
        """Mark the unfinished run of ``task_id`` failed and give back the pool slots its steps held (only the
        run's own process would otherwise: every later step of the pool would wait for them)."""
        for run in self.instance.get_runs(filters=dg.RunsFilter(tags={TASK_TAG: task_id})):
            if not run.is_finished:
                self.instance.report_run_failed(run, message)
            self.instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)

    def close(self) -> None:
        """Stop the workers after their runs; the runs of a worker that has to be terminated are marked failed."""
        for _proc, conn, _ in self.workers:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, conn, fut in self.workers:
            proc.join(timeout=30)
            if proc.is_alive():  # a worker still in a run (msif run was interrupted)
                proc.terminate()
                proc.join(timeout=10)
                if fut is not None:
                    self._fail_runs_of(fut.task_id, "msif run stopped while this run was executing")
            conn.close()


def _worker_main(conn) -> None:
    import logging
    import warnings

    from .lock import works_for

    warnings.filterwarnings("ignore")
    os.environ.setdefault("RUST_LOG", "error")
    os.environ.setdefault("LANCE_LOG", "error")
    logging.getLogger("dagster").setLevel(logging.WARNING)
    while True:
        task = conn.recv()
        if task is None:
            return
        works_for(task["tags"].get(HOLDER_TAG))  # this worker's steps work under that process's lock
        try:
            conn.send(("ok", execute_in_worker(**task)))
        except Exception as e:  # noqa: BLE001 - reported as the run's failure by the pool's owner
            conn.send(("error", f"{type(e).__name__}: {e}"))
        finally:
            works_for(None)


def execute_in_worker(kwargs: dict[str, Any], instance_ref: Any, keys: list[str], tags: dict[str, str],
                      run_config: dict[str, Any]) -> str:
    """In a worker process: one run of the assets ``keys`` (and their checks) with ``tags`` (the partition's
    among them) on the instance of ``instance_ref``, on Dagster's in-process executor; its run id (the
    outcome is in the instance)."""
    instance = dg.DagsterInstance.from_ref(instance_ref)
    try:
        result = dg.execute_job(reconstructable_job(kwargs, keys), instance=instance, run_config=run_config,
                                tags=tags, raise_on_error=False)
        return result.run_id
    finally:
        instance.dispose()
