"""The asset graph: one module per domain, each asset declared once with its deps, partitions, settings
and code (:mod:`.base`). Lineage (``[s]`` = one partition per corpus shard, ``[f]`` = per pre-train fit
shard)::

    pretraining_corpus[s] → corpus_shards[s] → corpus_embeddings[s] → candidates[s] ─────────┐   corpus
    corpus_shards[f], pretrained_checkpoint → pretrain_covariance_sums[f] → pretrain_eigenbasis │   pretrain
        → pretrain_lambda_sums[f] → pretrain_factors ─┐                                          │
    finetuned_checkpoint, finetuning_data → finetune_factors ─┤                                  │   finetune
    queries, finetuned_checkpoint ────────────────────────────┴→ query_ihvps ───────────────────┤   queries
                                                                        influence_scores[s] ←──┘   scores
                                 → score_tables (msif.duckdb) → attribution_report, attribution_quality   reports
    with [index] dimensions > 0 (msif_core.index; never rebuilt by a new fine-tune):
    corpus_shards[s], pretrained_checkpoint, pretrain_factors → influence_index[s] ──→ influence_scores[s]  index
    queries, finetuned_checkpoint, both factor sets → query_vectors ─────────────────→ influence_scores[s]

Each asset's ``code_version`` is a hash of the settings it declares; each carries an automation
condition: eager (re-materialise when an upstream asset updates or a partition is added) minus the
upstream edges that are also reached through another upstream asset (so a change flows down the graph
once, in order), or when its code version changes.
"""

from __future__ import annotations

import dagster as dg

from ..config import ExperimentConfig
from ..sources import SOURCE_KEYS
from . import corpus, finetune, index, pretrain, queries, reports, scores
from .base import (
    Deps,
    Node,
    attribution_settings,
    automation_condition,
    build,
    code_version,
    redundant_deps,
)
from .base import dependency_table as _dependency_table
from .scores import SCORES_SCHEMA, score_shard

NODES: tuple[Node, ...] = (*corpus.NODES, *pretrain.NODES, *finetune.NODES, *queries.NODES, *index.NODES,
                           *scores.NODES, *reports.NODES)
SOURCES = tuple(k.path[0] for k in SOURCE_KEYS)


def dependency_table(cfg: ExperimentConfig) -> Deps:
    """Every derived asset's upstream assets, for the configured methods."""
    return _dependency_table(NODES, cfg, SOURCES)


def code_versions(cfg: ExperimentConfig, embedder_name: str) -> dict[str, str]:
    """``code_version`` of every asset (whether or not ``cfg``'s graph includes it: it depends only on the
    settings the asset declares)."""
    return {n.name: code_version(n, cfg, embedder_name) for n in NODES}


def build_assets(cfg: ExperimentConfig, embedder_name: str = "all-MiniLM-L6-v2",
                 accelerator_pool: bool = True) -> list[dg.AssetsDefinition]:
    """The derived assets of ``cfg`` (sources are in :mod:`msif_assets.sources`); ``accelerator_pool``: the
    steps that run models are in the pool ``msif_accelerator``."""
    return build(NODES, cfg, embedder_name, SOURCES, accelerator_pool)


__all__ = ["NODES", "SCORES_SCHEMA", "attribution_settings", "automation_condition", "build_assets",
           "code_versions", "dependency_table", "redundant_deps", "score_shard"]
