"""Source assets: the two checkpoints and the three data sets, observed by content hash.

``observe_sources`` hashes them; ``sync_sources`` brings a Dagster instance up to date:

- the ``corpus_shards`` dynamic partitions follow the corpus (one per ``shard_size`` documents);
- the ``pretrain_fit_shards`` partitions (the shards the pre-train EK-FAC is fitted on, at most
  ``max_examples`` documents) are reset when the pre-trained checkpoint or the factor settings change,
  and are otherwise left alone, so a new corpus shard does not refit the pre-train factors;
- an observation with the new data version is recorded for every source (and corpus shard) whose
  content changed. Automation conditions then re-materialise exactly what became stale.

The same function serves ``msif run`` and the deployment's sensor (:func:`source_sensor`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import dagster as dg

from .config import ExperimentConfig
from .dagster_compat import latest_data_version, observation
from .io import CorpusReader, shard_index, tree_hash
from .layout import Layout

log = logging.getLogger(__name__)

CORPUS_PARTITIONS = dg.DynamicPartitionsDefinition(name="corpus_shards")
FIT_PARTITIONS = dg.DynamicPartitionsDefinition(name="pretrain_fit_shards")

PRETRAINED = dg.AssetKey("pretrained_checkpoint")
FINETUNED = dg.AssetKey("finetuned_checkpoint")
CORPUS = dg.AssetKey("pretraining_corpus")
FINETUNING_DATA = dg.AssetKey("finetuning_data")
QUERIES = dg.AssetKey("queries")
SOURCE_KEYS = (PRETRAINED, FINETUNED, CORPUS, FINETUNING_DATA, QUERIES)

_FIT_SIGNATURE = "msif/fit_signature"


@dataclass
class SourceSnapshot:
    """Content versions of every source; corpus versions per shard partition."""

    versions: dict[str, str]
    shard_versions: dict[str, str]
    n_documents: int


@dataclass
class SyncReport:
    """What :func:`sync_sources` changed."""

    added_shards: list[str] = field(default_factory=list)
    removed_shards: list[str] = field(default_factory=list)
    fit_shards: list[str] = field(default_factory=list)
    fit_reset: bool = False
    observed: list[str] = field(default_factory=list)  # "asset" or "asset[partition]" with a new version

    def summary(self) -> str:
        """One line for logs."""
        parts = []
        if self.added_shards:
            parts.append(f"new shards {self.added_shards}")
        if self.removed_shards:
            parts.append(f"removed shards {self.removed_shards}")
        if self.fit_reset:
            parts.append(f"pre-train factors fitted on {self.fit_shards}")
        if self.observed:
            parts.append(f"new content: {', '.join(self.observed)}")
        return "; ".join(parts) or "no source changed"


def checkpoint_version(path) -> str:
    """Content hash of a checkpoint folder."""
    return tree_hash([path])


def observe_sources(cfg: ExperimentConfig) -> SourceSnapshot:
    """Hash the checkpoints and data sets (cached by file size and modification time)."""
    reader = CorpusReader(cfg.corpus_files(), cfg.shard_size)
    return SourceSnapshot(
        versions={PRETRAINED.path[0]: checkpoint_version(cfg.pretrained),
                  FINETUNED.path[0]: checkpoint_version(cfg.finetuned),
                  FINETUNING_DATA.path[0]: tree_hash([cfg.finetuning_data]),
                  QUERIES.path[0]: tree_hash([cfg.queries])},
        shard_versions=reader.shard_versions(), n_documents=reader.n_rows)


def fit_shard_keys(cfg: ExperimentConfig, shard_keys: list[str]) -> list[str]:
    """Shards the pre-train EK-FAC is fitted on: the first ones, up to ``max_examples`` documents."""
    n = -(-cfg.factors.max_examples // cfg.shard_size)
    return sorted(k for k in shard_keys if shard_index(k) < n)


def plan_sync(instance: dg.DagsterInstance, cfg: ExperimentConfig,
              snap: SourceSnapshot) -> tuple[SyncReport, list, list[dg.AssetObservation], dict[str, str]]:
    """What to change: (report, dynamic partition requests, observations, instance key-value updates)."""
    rep = SyncReport()
    requests: list = []
    current = set(instance.get_dynamic_partitions(CORPUS_PARTITIONS.name))
    wanted = set(snap.shard_versions)
    rep.added_shards = sorted(wanted - current)
    rep.removed_shards = sorted(current - wanted)
    if rep.added_shards:
        requests.append(CORPUS_PARTITIONS.build_add_request(rep.added_shards))
    if rep.removed_shards:
        requests.append(CORPUS_PARTITIONS.build_delete_request(rep.removed_shards))

    signature = json.dumps({"pretrained": snap.versions[PRETRAINED.path[0]], "shard_size": cfg.shard_size,
                            "max_examples": cfg.factors.max_examples, "root": str(cfg.root)}, sort_keys=True)
    stored = instance.run_storage.get_cursor_values({_FIT_SIGNATURE}).get(_FIT_SIGNATURE)
    fit_now = set(instance.get_dynamic_partitions(FIT_PARTITIONS.name))
    fit_wanted = set(fit_shard_keys(cfg, sorted(wanted)))
    kv: dict[str, str] = {}
    if stored != signature or not fit_now or not fit_now <= wanted:
        if fit_wanted - fit_now:
            requests.append(FIT_PARTITIONS.build_add_request(sorted(fit_wanted - fit_now)))
        if fit_now - fit_wanted:
            requests.append(FIT_PARTITIONS.build_delete_request(sorted(fit_now - fit_wanted)))
        rep.fit_reset = fit_now != fit_wanted or stored != signature
        rep.fit_shards = sorted(fit_wanted)
        kv[_FIT_SIGNATURE] = signature
    else:
        rep.fit_shards = sorted(fit_now)

    observations = []
    for name, version in snap.versions.items():
        key = dg.AssetKey(name)
        if latest_data_version(instance, key, None) != version:
            observations.append(observation(key, version))
            rep.observed.append(name)
    for part, version in snap.shard_versions.items():
        if latest_data_version(instance, CORPUS, part) != version:
            observations.append(observation(CORPUS, version, part))
            rep.observed.append(f"{CORPUS.path[0]}[{part}]")
    return rep, requests, observations, kv


def sync_sources(instance: dg.DagsterInstance, cfg: ExperimentConfig,
                 snap: SourceSnapshot | None = None) -> SyncReport:
    """Observe the sources and apply partition changes and observations to ``instance`` directly."""
    snap = snap or observe_sources(cfg)
    rep, requests, observations, kv = plan_sync(instance, cfg, snap)
    for r in requests:
        if isinstance(r, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(r.partitions_def_name, list(r.partition_keys))
        else:
            for k in r.partition_keys:
                instance.delete_dynamic_partition(r.partitions_def_name, k)
    for k in rep.removed_shards:
        Layout(cfg.root).remove_shard(k)
    # partitions first, then observations (an observation of a partition needs the partition)
    for obs in observations:
        instance.report_runless_asset_event(obs)
    if kv:
        instance.run_storage.set_cursor_values(kv)
    log.info("sources: %s", rep.summary())
    return rep


def build_source_assets(cfg: ExperimentConfig) -> list[dg.SourceAsset]:
    """Observable source assets for the checkpoints and data sets (data version = content hash)."""

    def unpartitioned(key: dg.AssetKey, desc: str, fn):
        @dg.observable_source_asset(name=key.path[0], group_name="sources", description=desc)
        def _obs() -> dg.DataVersion:
            return dg.DataVersion(fn())

        return _obs

    @dg.observable_source_asset(name=CORPUS.path[0], group_name="sources", partitions_def=CORPUS_PARTITIONS,
                                description=f"Pre-training corpus {cfg.pretraining_corpus} (doc_id, text), "
                                            f"versioned per shard of {cfg.shard_size} documents.")
    def pretraining_corpus() -> dg.DataVersionsByPartition:
        reader = CorpusReader(cfg.corpus_files(), cfg.shard_size)
        return dg.DataVersionsByPartition(reader.shard_versions())

    return [
        unpartitioned(PRETRAINED, f"Pre-trained checkpoint θ_pt at {cfg.pretrained}.",
                      lambda: checkpoint_version(cfg.pretrained)),
        unpartitioned(FINETUNED, f"Fine-tuned checkpoint θ_ft at {cfg.finetuned}.",
                      lambda: checkpoint_version(cfg.finetuned)),
        pretraining_corpus,
        unpartitioned(FINETUNING_DATA, f"Fine-tuning data {cfg.finetuning_data} (prompt, completion).",
                      lambda: tree_hash([cfg.finetuning_data])),
        unpartitioned(QUERIES, f"Queries {cfg.queries} (query_id, prompt, completion[, true_doc_ids]).",
                      lambda: tree_hash([cfg.queries])),
    ]


def build_source_sensor(cfg: ExperimentConfig, minimum_interval_seconds: int = 60) -> dg.SensorDefinition:
    """A sensor that observes the sources, keeps the shard partitions in step with the corpus and
    records new data versions; the automation conditions then do the rest."""

    @dg.sensor(name="msif_source_sensor", minimum_interval_seconds=minimum_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Observes checkpoints and data by content hash; adds/removes corpus shard partitions.")
    def msif_source_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        snap = observe_sources(cfg)
        rep, requests, observations, kv = plan_sync(context.instance, cfg, snap)
        if kv:
            context.instance.run_storage.set_cursor_values(kv)
        for k in rep.removed_shards:
            Layout(cfg.root).remove_shard(k)
        if not requests and not observations:
            return dg.SkipReason("no source changed")
        context.log.info(rep.summary())
        return dg.SensorResult(dynamic_partitions_requests=requests, asset_events=observations)

    return msif_source_sensor
