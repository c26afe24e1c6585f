"""How an asset is declared: a :class:`Node` per asset (its deps, partitions, settings, resources and
code), and the :func:`asset` decorator that makes one. :func:`build` turns the nodes of an experiment
into Dagster asset definitions; the dependency table, the code versions and the automation conditions
are derived from the nodes, never written by hand.

An asset's code is a plain function of a :class:`Step`: the Dagster context, the experiment, and the
resources it declared (``lakehouse``, ``device``, ``embedder``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from ..config import ExperimentConfig
from ..layout import Layout
from ..resources import DeviceResource, EmbedderResource, LakehouseResource

PIPELINE_VERSION = "1"
POOL = "msif_accelerator"  # GPU-heavy steps; cap with `concurrency: pools:` in dagster.yaml

Describe = str | Callable[[ExperimentConfig, str], str]
Outputs = Callable[[Layout, "str | None", ExperimentConfig], list]  # (layout, partition, cfg) -> paths


@dataclass(frozen=True)
class Dep:
    """An upstream asset; ``identity`` maps corpus shard partitions one to one onto fit shard partitions;
    ``when`` (a test of the experiment) keeps the edge only where it holds."""

    asset: str
    identity: bool = False
    when: Callable[[ExperimentConfig], bool] | None = None


@dataclass(frozen=True)
class Node:
    """One asset of the graph, as declared by :func:`asset`."""

    name: str
    group: str
    fn: Callable[[Step], dg.MaterializeResult]
    deps: tuple[Dep, ...]
    settings: tuple[str, ...]  # the experiment settings its code version hashes
    version_extra: Callable[[ExperimentConfig, str], str] | None
    partitions: dg.PartitionsDefinition | None
    description: Describe
    kinds: tuple[str, ...]
    heavy: bool  # runs models: in the accelerator pool
    resources: tuple[str, ...]
    when: Callable[[ExperimentConfig], bool] | None  # in the graph only when this holds (None: always)
    outputs: Outputs | None = None  # the files it writes (recorded and verified, :mod:`msif_assets.outputs`)

    def included(self, cfg: ExperimentConfig) -> bool:
        """Whether this asset is part of ``cfg``'s graph."""
        return self.when is None or self.when(cfg)

    def describe(self, cfg: ExperimentConfig, embedder_name: str) -> str:
        """The asset's description for ``cfg``."""
        return self.description if isinstance(self.description, str) else self.description(cfg, embedder_name)


def asset(name: str, group: str, description: Describe, deps: Sequence[str | Dep] = (),
          settings: Sequence[str] = (), version_extra: Callable[[ExperimentConfig, str], str] | None = None,
          partitions: dg.PartitionsDefinition | None = None, kinds: Sequence[str] = (), heavy: bool = False,
          resources: Sequence[str] = ("lakehouse",),
          when: Callable[[ExperimentConfig], bool] | None = None,
          outputs: Outputs | None = None) -> Callable[[Callable], Node]:
    """Declare an asset: ``@asset("corpus_shards", "corpus", "...", deps=["pretraining_corpus"], ...)`` on a
    function of a :class:`Step`. A dep on an asset that is not in an experiment's graph is dropped;
    ``outputs(layout, partition, cfg)`` lists the files (or folders) it writes."""

    def wrap(fn: Callable[[Step], dg.MaterializeResult]) -> Node:
        return Node(name, group, fn, tuple(d if isinstance(d, Dep) else Dep(d) for d in deps), tuple(settings),
                    version_extra, partitions, description, tuple(kinds), heavy, tuple(resources), when, outputs)

    return wrap


@dataclass
class Step:
    """What an asset's code is given: the Dagster context, the experiment and its declared resources."""

    context: dg.AssetExecutionContext
    cfg: ExperimentConfig
    embedder_name: str

    @property
    def key(self) -> str:
        """The partition key being materialised."""
        return self.context.partition_key

    @property
    def log(self):
        """The run's logger."""
        return self.context.log

    @property
    def lakehouse(self) -> LakehouseResource:
        """The lakehouse resource."""
        return self.context.resources.lakehouse

    @property
    def layout(self) -> Layout:
        """Where every file lives."""
        return self.lakehouse.layout

    @property
    def device(self) -> DeviceResource:
        """The device resource (models)."""
        return self.context.resources.device

    @property
    def embedder(self) -> EmbedderResource:
        """The embedder resource."""
        return self.context.resources.embedder

    @property
    def settings(self):
        """The ``msif_core`` settings of this experiment."""
        return attribution_settings(self.cfg)

    def model_versions(self) -> tuple[str, str]:
        """Content hashes of the pre-trained and fine-tuned checkpoints."""
        from ..sources import checkpoint_version

        return checkpoint_version(self.cfg.pretrained), checkpoint_version(self.cfg.finetuned)

    def stages(self):
        """Both checkpoints, loaded once per process (:meth:`DeviceResource.stages`)."""
        return self.device.stages(self.cfg.pretrained, self.cfg.finetuned, self.settings, self.model_versions())


class Timer:
    """Seconds since creation."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Elapsed seconds."""
        return time.perf_counter() - self.t0


def fix(asset_name: str, key: str | None = None) -> str:
    """The advice that recomputes an asset (partition)."""
    where = f"partition {key} of {asset_name}" if key else asset_name
    return f"rematerialise {where} (`msif run --force`, or Materialize in the Dagster UI)"


def attribution_settings(cfg: ExperimentConfig):
    """The ``msif_core`` settings of this experiment."""
    from msif_core.api import AttributionSettings

    f, s = cfg.factors, cfg.scores
    return AttributionSettings(fisher=f.fisher, attention_blocks=f.attention_blocks, modules=f.modules,
                               module_tags=dict(f.module_tags) or None,
                               max_examples=f.max_examples, max_length=f.max_length, batch_size=f.batch_size,
                               damping_pretrain=s.damping_pretrain, damping_finetune=s.damping_finetune,
                               query_rank=s.query_rank, methods=s.gradient_methods)


def memory_plan(step: Step, pt, ft, queries: int, query_tokens: int):
    """The memory plan (``msif_core.plan``) of a step holding both stages' models, factors read lazily:
    query_ihvps chunks by it, influence_scores takes its document batch and candidate group."""
    from msif_core.plan import model_bytes, plan_memory, vocab_size

    cfg = step.cfg
    return plan_memory(ft.specs, queries, cfg.scores.query_rank, query_tokens, next(ft.model.parameters()).dtype,
                       cfg.scores.memory_gib, next(ft.model.parameters()).device, cfg.factors.max_length,
                       resident_bytes=model_bytes(pt.model, ft.model), batch_size=cfg.factors.batch_size,
                       vocab=vocab_size(pt.model))


# ----------------------------------------------------------------------------------------------- graph

Deps = dict[str, list[tuple[str, str | None]]]  # asset -> [(upstream, "identity" | None)]


def included(nodes: Sequence[Node], cfg: ExperimentConfig) -> list[Node]:
    """The nodes of ``cfg``'s graph, in declaration order."""
    return [n for n in nodes if n.included(cfg)]


def dependency_table(nodes: Sequence[Node], cfg: ExperimentConfig, sources: Sequence[str]) -> Deps:
    """Every derived asset's upstream assets (deps on assets outside the graph dropped)."""
    present = {n.name for n in included(nodes, cfg)} | set(sources)
    return {n.name: [(d.asset, "identity" if d.identity else None) for d in n.deps
                     if d.asset in present and (d.when is None or d.when(cfg))]
            for n in included(nodes, cfg)}


def redundant_deps(deps: Deps) -> dict[str, set[str]]:
    """Per asset, the upstream assets that are also ancestors of another of its upstream assets.

    Their updates reach the asset through that other path; reacting to them directly would
    recompute it before the path in between has been brought up to date.
    """
    memo: dict[str, set[str]] = {}

    def ancestors(name: str) -> set[str]:
        if name not in memo:
            out: set[str] = set()
            for d, _ in deps.get(name, []):
                out |= {d} | ancestors(d)
            memo[name] = out
        return memo[name]

    return {name: {d for d, _ in ds if any(d in ancestors(o) for o, _ in ds if o != d)} for name, ds in deps.items()}


def automation_condition(ignored: set[str]) -> dg.AutomationCondition:
    """Eager minus ``ignored`` upstream assets, or a changed code version."""
    eager = dg.AutomationCondition.eager()
    if ignored:
        eager = eager.ignore(dg.AssetSelection.assets(*sorted(ignored)))
    code = (dg.AutomationCondition.code_version_changed() & ~dg.AutomationCondition.any_deps_missing()
            & ~dg.AutomationCondition.in_progress()).with_label("code_version_changed")
    return eager | code


def code_version(node: Node, cfg: ExperimentConfig, embedder_name: str) -> str:
    """The pipeline version, a hash of the settings ``node`` depends on, and of its extra version string."""
    extra = node.version_extra(cfg, embedder_name) if node.version_extra else ""
    tail = "-" + hashlib.sha256(extra.encode()).hexdigest()[:8] if extra else ""
    return f"{PIPELINE_VERSION}-{cfg.digest(*node.settings)}{tail}"


def build(nodes: Sequence[Node], cfg: ExperimentConfig, embedder_name: str,
          sources: Sequence[str], accelerator_pool: bool = True) -> list[dg.AssetsDefinition]:
    """Dagster asset definitions of ``cfg``'s nodes; with ``accelerator_pool`` the heavy ones (they run
    models) are in the pool :data:`POOL`."""
    deps = dependency_table(nodes, cfg, sources)
    ignored = redundant_deps(deps)

    def define(n: Node) -> dg.AssetsDefinition:
        kw: dict[str, Any] = {"pool": POOL} if n.heavy and accelerator_pool else {}

        @dg.asset(name=n.name, group_name=n.group, description=n.describe(cfg, embedder_name),
                  deps=[dg.AssetDep(d, partition_mapping=dg.IdentityPartitionMapping()) if m == "identity"
                        else dg.AssetDep(d) for d, m in deps[n.name]],
                  partitions_def=n.partitions, code_version=code_version(n, cfg, embedder_name),
                  automation_condition=automation_condition(ignored[n.name]), kinds=set(n.kinds) or None,
                  required_resource_keys=set(n.resources), **kw)
        def compute(context) -> dg.MaterializeResult:  # unannotated: the string annotation would be refused
            return run_step(n, Step(context, cfg, embedder_name), pooled=bool(kw))

        return compute

    return [define(n) for n in included(nodes, cfg)]


FAULT_ENV = "MSIF_FAULT"  # "asset" or "asset[partition]": that step's process exits at once (tests of crashes)


@contextmanager
def pool_turn(context: dg.AssetExecutionContext, pool: str = POOL) -> Iterator[None]:
    """Hold one of this machine's slots of ``pool`` (as many as the instance's limit of it,
    :func:`msif_assets.lock.pool_slot`) for the block: Dagster's own claim can let two processes through at
    once on a SQLite instance. No limit on the instance (or no local instance folder): nothing is held."""
    from ..lock import pool_slot

    inst = context.instance
    try:
        limit = inst.event_log_storage.get_concurrency_info(pool).limit
        folder = Path(inst.root_directory) / ".msif_pools"
    except Exception:  # noqa: BLE001 - a storage without pools, an instance without a folder: Dagster's cap only
        limit = None
    if not limit:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only instance folder: Dagster's own cap only
        context.log.warning(f"{folder}: cannot hold a slot file of the pool {pool} ({e}); Dagster's claim only")
        yield
        return
    with pool_slot(folder, pool, limit, on_wait=context.log.info):
        yield


def run_step(n: Node, step: Step, pooled: bool = False) -> dg.MaterializeResult:
    """An asset's code under the lakehouse lock (and, when ``pooled``, in a slot of the accelerator pool:
    :func:`pool_turn`), its written files fingerprinted into the metadata."""
    from ..lock import locked
    from ..outputs import OUTPUTS_KEY, ROOT_KEY, fingerprint

    root = Path(step.cfg.root)
    fault = os.environ.get(FAULT_ENV)
    if fault and fault in (n.name, f"{n.name}[{step.key if n.partitions is not None else ''}]"):
        os._exit(70)  # a process that dies (out of memory, a crash in native code): no exception, no cleanup
    with locked(root, on_wait=step.log.info), (pool_turn(step.context) if pooled else nullcontext()):
        res = n.fn(step)
        if n.outputs is None:
            return res
        part = step.key if n.partitions is not None else None
        fp = fingerprint(n.outputs(step.layout, part, step.cfg), root)
    return dg.MaterializeResult(metadata={**(res.metadata or {}), OUTPUTS_KEY: dg.MetadataValue.json(fp),
                                          ROOT_KEY: str(root.resolve())},
                                data_version=res.data_version, check_results=res.check_results, tags=res.tags)


# ----------------------------------------------------------------------------------------------- factors

FACTOR_SETTINGS = ("factors.fisher", "factors.attention_blocks", "factors.modules", "factors.max_examples",
                   "factors.max_length", "factors.batch_size", "factors.module_tags")


def fingerprint_version(cfg: ExperimentConfig, embedder_name: str) -> str:
    """Factor manifests carry the models' fingerprint: a new fingerprint definition refits them."""
    from msif_core.models import FINGERPRINT_VERSION

    return f"fingerprint-{FINGERPRINT_VERSION}"


def factor_metadata(factors, seconds: float, path) -> dict[str, Any]:
    """Materialisation metadata of a factor set: sizes, counts, speed and a table of its blocks."""
    import pandas as pd

    from ..markdown import md_table

    rows = []
    for name, spec in factors.specs.items():
        lam = factors.lam[name]
        rows.append({"module": name, "kind": spec.kind, "blocks": spec.n_blocks, "p": spec.p, "d": spec.d,
                     "mean_lambda": float(lam.mean()), "max_lambda": float(lam.max())})
    m = factors.manifest
    return {"modules": len(factors.specs), "blocks": int(sum(s.n_blocks for s in factors.specs.values())),
            "stored_floats": factors.n_floats(), "sequences": int(m.get("sequences", 0)),
            "tokens": int(m.get("tokens", 0)), "seconds": round(seconds, 3),
            "tokens_per_second": round(2 * int(m.get("tokens", 0)) / max(seconds, 1e-9), 1),
            "fingerprint": str(m.get("fingerprint")), "path": dg.MetadataValue.path(str(path)),
            "truncated_sequences": int(m.get("truncated", 0)),
            "blocks_table": dg.MetadataValue.md(md_table(pd.DataFrame(rows)))}
