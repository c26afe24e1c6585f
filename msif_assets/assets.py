"""The asset graph: thin Dagster assets that call ``msif_core`` and write files under the lakehouse root.

Lineage (``[s]`` = one partition per corpus shard, ``[f]`` = per pre-train fit shard)::

    pretraining_corpus[s] → corpus_shards[s] → corpus_embeddings[s] → candidates[s] ─────────┐
    corpus_shards[f], pretrained_checkpoint → pretrain_covariance_sums[f] → pretrain_eigenbasis │
        → pretrain_lambda_sums[f] → pretrain_factors ─┐                                          │
    finetuned_checkpoint, finetuning_data → finetune_factors ─┤                                  │
    queries, finetuned_checkpoint ────────────────────────────┴→ query_ihvps ───────────────────┤
                                                                        influence_scores[s] ←──┘
                                 → score_tables (msif.duckdb) → attribution_report, attribution_quality

Each asset's ``code_version`` is a hash of the settings it depends on; each carries an automation
condition: eager (re-materialise when an upstream asset updates or a partition is added) minus the
upstream edges that are also reached through another upstream asset (so a change flows down the graph
once, in order), or when its code version changes.
"""


import base64
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from dagster_project.config import GRADIENT_METHODS, ExperimentConfig
from dagster_project.resources import DeviceResource, EmbedderResource
from msif_core.models import FINGERPRINT_VERSION

from .io import (
    CorpusReader,
    CorruptTableError,
    frame_hash,
    read_parquet_checked,
    read_records,
    shard_index,
    write_parquet_atomic,
    write_text_atomic,
)
from .layout import Layout
from .sources import CORPUS_PARTITIONS, FIT_PARTITIONS, checkpoint_version
from .views import connect, create_database, run_named

log = logging.getLogger(__name__)

PIPELINE_VERSION = "1"
POOL = "msif_accelerator"  # GPU-heavy steps; cap with `concurrency: pools:` in dagster.yaml
FACTOR_SETTINGS = ("factors.fisher", "factors.attention_blocks", "factors.modules", "factors.max_examples",
                   "factors.max_length", "factors.batch_size", "factors.module_tags")

def _scores_schema():
    import pyarrow as pa

    return pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("method", pa.string()),
                      ("score", pa.float64()), ("mlp_score", pa.float64()), ("mha_score", pa.float64()),
                      ("shard_rank", pa.int64()), ("shard", pa.string()), ("candidate_distance", pa.float64()),
                      ("damping_pretrain", pa.string()), ("damping_finetune", pa.string()),
                      ("pretrained_version", pa.string()), ("finetuned_version", pa.string())])


SCORES_SCHEMA = _scores_schema()  # columns of every influence_scores partition

# (name, [(dep, mapping)]) — mapping "identity" maps corpus shard keys onto fit shard keys
Deps = dict[str, list[tuple[str, str | None]]]


def dependency_table(cfg: ExperimentConfig) -> Deps:
    """Every derived asset's upstream assets, for the configured methods."""
    s = cfg.scores
    deps: Deps = {
        "corpus_shards": [("pretraining_corpus", None)],
        "corpus_embeddings": [("corpus_shards", None)],
        "candidates": [("corpus_embeddings", None), ("queries", None)],
    }
    ihvp_deps: list[tuple[str, str | None]] = [("queries", None), ("finetuned_checkpoint", None)]
    if s.needs_pretrain_factors:
        deps["pretrain_covariance_sums"] = [("corpus_shards", "identity"), ("pretrained_checkpoint", None)]
        deps["pretrain_eigenbasis"] = [("pretrain_covariance_sums", None)]
        deps["pretrain_lambda_sums"] = [("corpus_shards", "identity"), ("pretrain_eigenbasis", None),
                                        ("pretrained_checkpoint", None)]
        deps["pretrain_factors"] = [("pretrain_lambda_sums", None), ("pretrain_eigenbasis", None),
                                    ("pretrained_checkpoint", None)]
        ihvp_deps.append(("pretrain_factors", None))
    if s.needs_finetune_factors:
        deps["finetune_factors"] = [("finetuned_checkpoint", None), ("finetuning_data", None)]
        ihvp_deps.append(("finetune_factors", None))
    deps["query_ihvps"] = ihvp_deps
    deps["influence_scores"] = [("candidates", None), ("corpus_shards", None), ("query_ihvps", None),
                                ("pretrained_checkpoint", None), ("finetuned_checkpoint", None)]
    deps["score_tables"] = [("influence_scores", None)]
    deps["attribution_report"] = [("score_tables", None)]
    if cfg.has_ground_truth():
        deps["attribution_quality"] = [("score_tables", None)]
    return deps


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


def code_versions(cfg: ExperimentConfig, embedder_name: str) -> dict[str, str]:
    """``code_version`` of every asset: the pipeline version and a hash of the settings it depends on."""
    import hashlib

    def v(*parts: str, extra: str = "") -> str:
        tail = "-" + hashlib.sha256(extra.encode()).hexdigest()[:8] if extra else ""
        return f"{PIPELINE_VERSION}-{cfg.digest(*parts)}{tail}"

    # the factors' manifests carry the models' fingerprint: a new fingerprint definition refits/reassembles them
    fp = f"fingerprint-{FINGERPRINT_VERSION}"
    fit = v("shard_size", *FACTOR_SETTINGS)
    return {
        "corpus_shards": v("shard_size"),
        "corpus_embeddings": v(extra=embedder_name),
        "candidates": v("scores.candidates", extra=embedder_name),
        "pretrain_covariance_sums": fit, "pretrain_eigenbasis": fit, "pretrain_lambda_sums": fit,
        "pretrain_factors": v("shard_size", *FACTOR_SETTINGS, extra=fp),
        "finetune_factors": v(*FACTOR_SETTINGS, extra=fp),
        "query_ihvps": v("factors.attention_blocks", "factors.modules", "factors.module_tags", "factors.max_length",
                         "scores.damping_pretrain", "scores.damping_finetune", "scores.query_rank", "scores.methods"),
        "influence_scores": v("scores.methods", "factors.max_length", "scores.damping_pretrain",
                              "scores.damping_finetune"),
        "score_tables": v("scores.methods"),
        "attribution_report": v(),
        "attribution_quality": v(),
    }


# ----------------------------------------------------------------------------------------------- helpers

def md_table(df: pd.DataFrame, floatfmt: str = ".4g", max_rows: int = 50) -> str:
    """A Markdown table (no extra dependency)."""
    df = df.head(max_rows)

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return "" if math.isnan(x) else format(x, floatfmt)
        return str(x).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(cell(x) for x in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


class Timer:
    """Seconds since creation."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Elapsed seconds."""
        return time.perf_counter() - self.t0


def attribution_settings(cfg: ExperimentConfig):
    """The ``msif_core`` settings of this experiment."""
    from msif_core.api import AttributionSettings

    f, s = cfg.factors, cfg.scores
    return AttributionSettings(fisher=f.fisher, attention_blocks=f.attention_blocks, modules=f.modules,
                               module_tags=dict(f.module_tags) or None,
                               max_examples=f.max_examples, max_length=f.max_length, batch_size=f.batch_size,
                               damping_pretrain=s.damping_pretrain, damping_finetune=s.damping_finetune,
                               query_rank=s.query_rank, methods=s.gradient_methods)


def _fix(asset: str, key: str | None = None) -> str:
    where = f"partition {key} of {asset}" if key else asset
    return f"rematerialise {where} (`msif run --force`, or Materialize in the Dagster UI)"


def _documents(layout: Layout, key: str) -> pd.DataFrame:
    return read_parquet_checked(layout.documents(key), f"corpus shard {key}", _fix("corpus_shards", key),
                                ("doc_id", "text"))


def _queries_table(layout: Layout) -> pd.DataFrame:
    return read_parquet_checked(layout.queries, "queries table", _fix("query_ihvps"),
                                ("query_id", "prompt", "completion", "scored"))


def _pool_kwargs() -> dict[str, Any]:
    return {"pool": POOL}


# ----------------------------------------------------------------------------------------------- assets

def build_assets(cfg: ExperimentConfig, embedder_name: str = "all-MiniLM-L6-v2") -> list[dg.AssetsDefinition]:
    """The derived assets of ``cfg`` (sources are in :mod:`msif_assets.sources`)."""
    deps_table = dependency_table(cfg)
    ignored = redundant_deps(deps_table)
    versions = code_versions(cfg, embedder_name)
    layout = Layout(cfg.root)
    settings = attribution_settings(cfg)
    methods = cfg.scores.methods
    partitions = {"corpus_shards": CORPUS_PARTITIONS, "corpus_embeddings": CORPUS_PARTITIONS,
                  "candidates": CORPUS_PARTITIONS, "influence_scores": CORPUS_PARTITIONS,
                  "pretrain_covariance_sums": FIT_PARTITIONS, "pretrain_lambda_sums": FIT_PARTITIONS,
                  "pretraining_corpus": CORPUS_PARTITIONS}

    def deps_of(name: str) -> list[dg.AssetDep]:
        out = []
        for d, mapping in deps_table[name]:
            pm = dg.IdentityPartitionMapping() if mapping == "identity" else None
            out.append(dg.AssetDep(d, partition_mapping=pm) if pm else dg.AssetDep(d))
        return out

    def asset(name: str, group: str, description: str, heavy: bool = False, **kw):
        return dg.asset(name=name, deps=deps_of(name), partitions_def=partitions.get(name), group_name=group,
                        code_version=versions[name], automation_condition=automation_condition(ignored[name]),
                        description=description, kinds=kw.pop("kinds", None),
                        **(_pool_kwargs() if heavy else {}), **kw)

    def model_versions() -> tuple[str, str]:
        return checkpoint_version(cfg.pretrained), checkpoint_version(cfg.finetuned)

    def stages(device: DeviceResource):
        return device.stages(cfg.pretrained, cfg.finetuned, settings, model_versions())

    out: list[dg.AssetsDefinition] = []

    # -------------------------------------------------------------------------------- corpus side
    @asset("corpus_shards", "corpus", f"The corpus cut into shards of {cfg.shard_size} documents (Parquet).",
           kinds={"parquet"})
    def corpus_shards(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        key = context.partition_key
        t = Timer()
        reader = CorpusReader(cfg.corpus_files(), cfg.shard_size)
        df = reader.read_shard(shard_index(key))
        if df.empty:
            raise dg.Failure(f"shard {key} is empty: the corpus now has {reader.n_rows} documents "
                             f"({reader.n_shards} shards). Run `msif run` (or the source sensor) to drop stale "
                             f"shard partitions.")
        dup = df["doc_id"][df["doc_id"].duplicated()].unique()
        if len(dup):
            raise dg.Failure(f"shard {key}: duplicate doc_id(s) {list(dup[:5])} in {cfg.pretraining_corpus}; "
                             f"doc_id must be unique")
        df["shard"] = key
        path = write_parquet_atomic(df[["doc_id", "text", "shard", "row"]], layout.documents(key))
        version = frame_hash(df, ["doc_id", "text"])
        context.log.info(f"{key}: {len(df)} documents → {path}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={"documents": len(df), "dagster/row_count": len(df), "first_doc_id": str(df.doc_id.iloc[0]),
                      "last_doc_id": str(df.doc_id.iloc[-1]), "mean_characters": float(df.text.str.len().mean()),
                      "seconds": round(t.seconds, 3), "path": dg.MetadataValue.path(str(path)),
                      "preview": dg.MetadataValue.md(md_table(df[["doc_id", "text"]].head(5)))})

    out.append(corpus_shards)

    @asset("corpus_embeddings", "corpus", f"Sentence embeddings of each shard ({embedder_name}) in LanceDB.",
           kinds={"lancedb"})
    def corpus_embeddings(context: dg.AssetExecutionContext, embedder: EmbedderResource) -> dg.MaterializeResult:
        import lancedb
        import pyarrow as pa

        key = context.partition_key
        df = _documents(layout, key)
        t = Timer()
        vecs = embedder.encode(df.text.tolist())
        secs = t.seconds
        dim = vecs.shape[1]
        table = pa.table({"doc_id": pa.array(df.doc_id.astype(str)), "shard": pa.array([key] * len(df)),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim)})
        db = lancedb.connect(str(layout.lancedb))
        db.create_table(layout.embedding_table(key), table, mode="overwrite")
        context.log.info(f"{key}: embedded {len(df)} documents in {secs:.1f}s ({len(df) / max(secs, 1e-9):.0f}/s)")
        return dg.MaterializeResult(metadata={
            "documents": len(df), "dimensions": dim, "model": embedder.model_name, "seconds": round(secs, 3),
            "documents_per_second": round(len(df) / max(secs, 1e-9), 1),
            "table": f"{layout.lancedb}/{layout.embedding_table(key)}"})

    out.append(corpus_embeddings)

    k = cfg.scores.candidates

    @asset("candidates", "corpus",
           "Documents each query scores in this shard: " + ("all of them." if k == "all" else
                                                          f"its {k} nearest by cosine similarity (LanceDB)."),
           kinds={"lancedb", "parquet"})
    def candidates(context: dg.AssetExecutionContext, embedder: EmbedderResource) -> dg.MaterializeResult:
        import lancedb

        key = context.partition_key
        t = Timer()
        q = read_records(cfg.queries, "queries", ("query_id", "prompt", "completion"))
        q["query_id"] = q["query_id"].astype(str)
        try:
            tbl = lancedb.connect(str(layout.lancedb)).open_table(layout.embedding_table(key))
        except (ValueError, FileNotFoundError, OSError) as e:
            raise CorruptTableError(f"candidates {key}: no LanceDB table {layout.embedding_table(key)} in "
                                    f"{layout.lancedb} ({e}). Fix: {_fix('corpus_embeddings', key)}") from e
        if k == "all":
            doc_ids = tbl.to_arrow().column("doc_id").to_pylist()
            df = pd.DataFrame({"query_id": np.repeat(q.query_id.to_numpy(), len(doc_ids)),
                               "doc_id": np.tile(np.asarray(doc_ids, dtype=object), len(q)),
                               "distance": np.nan, "neighbour_rank": 0})
        else:
            vecs = embedder.encode((q.prompt.astype(str) + q.completion.astype(str)).tolist())
            res = (tbl.search([v for v in vecs]).distance_type("cosine").limit(int(k)).select(["doc_id", "_distance"])
                   .to_arrow().to_pandas())
            if "query_index" not in res.columns:  # a single query comes back without its index
                res["query_index"] = 0
            res = res.sort_values(["query_index", "_distance", "doc_id"])
            df = pd.DataFrame({"query_id": q.query_id.to_numpy()[res.query_index.to_numpy()],
                               "doc_id": res.doc_id.to_numpy(), "distance": res._distance.to_numpy()})
            df["neighbour_rank"] = df.groupby("query_id").cumcount() + 1
        df["shard"] = key
        path = write_parquet_atomic(df, layout.candidates(key))
        return dg.MaterializeResult(metadata={
            "pairs": len(df), "dagster/row_count": len(df), "queries": int(df.query_id.nunique()),
            "documents": int(df.doc_id.nunique()), "per_query": str(k), "seconds": round(t.seconds, 3),
            "path": dg.MetadataValue.path(str(path))})

    out.append(candidates)

    # -------------------------------------------------------------------------------- pre-train EK-FAC
    if "pretrain_factors" in deps_table:
        from msif_core.ekfac import (
            CovarianceSums,
            Eigenbasis,
            FitSettings,
            LambdaSums,
            covariance_sums,
            eigenbasis,
            finalize,
            lambda_sums,
            merge_all,
        )

        def fit_settings(shard: int) -> FitSettings:
            return FitSettings(fisher=cfg.factors.fisher, max_examples=cfg.factors.max_examples,
                               batch_size=cfg.factors.batch_size, seed=settings.seed, shard=shard)

        def fit_documents(key: str, pt) -> tuple[Any, int]:
            from msif_core.data import encode_documents

            i = shard_index(key)
            df = _documents(layout, key)
            limit = max(0, min(len(df), cfg.factors.max_examples - i * cfg.shard_size))
            enc = encode_documents(pt.loaded.tokenizer, df.text.tolist()[:limit], cfg.factors.max_length)
            if len(enc) == 0:
                raise dg.Failure(f"pre-train fit shard {key}: no document with at least 2 tokens")
            return enc, i

        def fit_keys(context: dg.AssetExecutionContext) -> list[str]:
            keys = sorted(context.instance.get_dynamic_partitions(FIT_PARTITIONS.name))
            if not keys:
                raise dg.Failure("no pre-train fit shards are registered; run `msif run` or the source sensor")
            return keys

        def load_parts(paths: list[Path], loader: Callable, what: str, asset_name: str, keys: list[str]):
            parts = []
            for p, key in zip(paths, keys):
                if not p.exists():
                    raise CorruptTableError(f"{what} of {key} is missing ({p}). Fix: {_fix(asset_name, key)}")
                try:
                    parts.append(loader(p))
                except Exception as e:  # noqa: BLE001 - any unreadable partial file gets the same advice
                    raise CorruptTableError(f"{what} of {key}: {p} is unreadable ({e}). "
                                            f"Fix: {_fix(asset_name, key)}") from e
            return parts

        @asset("pretrain_covariance_sums", "pretrain_factors",
               "Map step 1: EK-FAC covariance sums (A, S) of θ_pt over one fit shard.", heavy=True,
               kinds={"pytorch", "safetensors"})
        def pretrain_covariance_sums(context: dg.AssetExecutionContext, device: DeviceResource) -> dg.MaterializeResult:
            key = context.partition_key
            pt, _ = stages(device)
            enc, i = fit_documents(key, pt)
            t = Timer()
            sums = covariance_sums(pt.model, pt.specs, enc, fit_settings(i), pt.pad_id)
            sums.save(layout.covariance_sums(key))
            secs = t.seconds
            return dg.MaterializeResult(metadata={
                "sequences": sums.sequences, "tokens": sums.tokens, "seconds": round(secs, 3),
                "truncated_documents": enc.n_truncated,
                "tokens_per_second": round(sums.tokens / max(secs, 1e-9), 1), "modules": len(sums.a),
                "path": dg.MetadataValue.path(str(layout.covariance_sums(key)))})

        @asset("pretrain_eigenbasis", "pretrain_factors",
               "Reduce step 1: merged covariances → eigenvectors Q_A, Q_S (float64 eigh).", heavy=True,
               kinds={"pytorch", "safetensors"})
        def pretrain_eigenbasis(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            keys = fit_keys(context)
            t = Timer()
            parts = load_parts([layout.covariance_sums(k) for k in keys], CovarianceSums.load, "covariance sums",
                               "pretrain_covariance_sums", keys)
            sums = merge_all(parts)
            basis = eigenbasis(sums)
            basis.save(layout.eigenbasis)
            return dg.MaterializeResult(metadata={
                "fit_shards": ", ".join(keys), "tokens": sums.tokens, "sequences": sums.sequences,
                "modules": len(basis.q_a), "seconds": round(t.seconds, 3),
                "path": dg.MetadataValue.path(str(layout.eigenbasis))})

        @asset("pretrain_lambda_sums", "pretrain_factors",
               "Map step 2: sums of squared rotated per-sequence gradients (Λ) over one fit shard.", heavy=True,
               kinds={"pytorch", "safetensors"})
        def pretrain_lambda_sums(context: dg.AssetExecutionContext, device: DeviceResource) -> dg.MaterializeResult:
            key = context.partition_key
            pt, _ = stages(device)
            enc, i = fit_documents(key, pt)
            if not layout.eigenbasis.exists():
                raise CorruptTableError(f"{layout.eigenbasis} is missing. Fix: {_fix('pretrain_eigenbasis')}")
            basis = Eigenbasis.load(layout.eigenbasis)
            t = Timer()
            lam = lambda_sums(pt.model, pt.specs, enc, basis, fit_settings(i), pt.pad_id)
            lam.save(layout.lambda_sums(key))
            secs = t.seconds
            return dg.MaterializeResult(metadata={
                "sequences": lam.sequences, "tokens": enc.n_tokens, "seconds": round(secs, 3),
                "tokens_per_second": round(enc.n_tokens / max(secs, 1e-9), 1),
                "path": dg.MetadataValue.path(str(layout.lambda_sums(key)))})

        @asset("pretrain_factors", "pretrain_factors",
               "Reduce step 2: EK-FAC factors of θ_pt (Q_A, Q_S, Λ) on the fit shards.", heavy=True,
               kinds={"pytorch", "safetensors"})
        def pretrain_factors(context: dg.AssetExecutionContext, device: DeviceResource) -> dg.MaterializeResult:
            keys = fit_keys(context)
            pt, _ = stages(device)
            t = Timer()
            parts = load_parts([layout.lambda_sums(k) for k in keys], LambdaSums.load, "Λ sums",
                               "pretrain_lambda_sums", keys)
            basis = Eigenbasis.load(layout.eigenbasis)
            factors = finalize(pt.model, pt.specs, basis, merge_all(parts), fit_settings(0),
                               {"stage": "pretrain", "fit_shards": keys, "checkpoint": str(cfg.pretrained),
                                "checkpoint_version": model_versions()[0]})
            factors.save(layout.pretrain_factors)
            return dg.MaterializeResult(metadata=_factor_metadata(factors, t.seconds, layout.pretrain_factors))

        out += [pretrain_covariance_sums, pretrain_eigenbasis, pretrain_lambda_sums, pretrain_factors]

    # -------------------------------------------------------------------------------- fine-tune EK-FAC
    if "finetune_factors" in deps_table:
        @asset("finetune_factors", "finetune_factors",
               "EK-FAC factors of θ_ft on the fine-tuning data (completion tokens only).", heavy=True,
               kinds={"pytorch", "safetensors"})
        def finetune_factors(context: dg.AssetExecutionContext, device: DeviceResource) -> dg.MaterializeResult:
            from msif_core.api import encode_queries, fit_stage_factors

            _, ft = stages(device)
            data = read_records(cfg.finetuning_data, "fine-tuning data", ("prompt", "completion"))
            enc = encode_queries(ft, data.prompt.astype(str).tolist(), data.completion.tolist(),
                                 cfg.factors.max_length)
            t = Timer()
            factors = fit_stage_factors(ft, enc, settings)
            factors.manifest.update({"stage": "finetune", "checkpoint": str(cfg.finetuned),
                                     "checkpoint_version": model_versions()[1]})
            factors.save(layout.finetune_factors)
            md = _factor_metadata(factors, t.seconds, layout.finetune_factors)
            md["tokens_per_second"] = round(2 * enc.n_tokens / max(t.seconds, 1e-9), 1)  # two passes
            return dg.MaterializeResult(metadata=md)

        out.append(finetune_factors)

    # -------------------------------------------------------------------------------- query side
    grad_methods = cfg.scores.gradient_methods

    @asset("query_ihvps", "scores",
           "Measurement gradients ∇m of the queries on θ_ft, preconditioned per method (MS-IF: P_pt P_ft ∇m; "
           "SS-IF: P_ft ∇m; GDP: ∇m), and the queries with the fine-tuned model's answers.", heavy=True,
           kinds={"pytorch", "safetensors", "parquet"})
    def query_ihvps(context: dg.AssetExecutionContext, device: DeviceResource) -> dg.MaterializeResult:
        from msif_core.api import encode_queries
        from msif_core.ekfac import Factors
        from msif_core.models import fingerprint
        from msif_core.query import measurement_gradients
        from msif_core.query import query_ihvps as precondition

        pt, ft = stages(device)
        q = read_records(cfg.queries, "queries", ("query_id", "prompt", "completion"))
        q["query_id"] = q["query_id"].astype(str)
        if q.query_id.duplicated().any():
            raise dg.Failure(f"{cfg.queries}: duplicate query_id(s) {q.query_id[q.query_id.duplicated()].tolist()[:5]}")
        t = Timer()
        qenc = encode_queries(ft, q.prompt.astype(str).tolist(), q.completion.tolist(), cfg.factors.max_length)
        qids = q.query_id.iloc[qenc.kept].tolist()
        md: dict[str, Any] = {"queries": len(q), "scored_queries": len(qids), "completion_tokens": int(
            sum(sum(m) for m in qenc.loss_mask))}
        if grad_methods:
            grads = measurement_gradients(ft.model, ft.specs, qenc, cfg.factors.batch_size, ft.pad_id)
            ftf = ptf = None
            if cfg.scores.needs_finetune_factors:
                ftf = Factors.load(layout.finetune_factors, expect_fingerprint=fingerprint(ft.model, ft.specs))
            if cfg.scores.needs_pretrain_factors:
                ptf = Factors.load(layout.pretrain_factors, expect_fingerprint=fingerprint(pt.model, pt.specs))
            for m in grad_methods:
                ih = precondition(grads, ft.specs, m, ftf, ptf, cfg.scores.damping_finetune,
                                  cfg.scores.damping_pretrain, cfg.scores.query_rank)
                ih.manifest["query_ids"] = qids
                ih.save(layout.ihvps(m))
                norm = math.sqrt(sum(float((ih.matrix(n).double() ** 2).sum()) for n in ih.specs))
                md[f"norm/{m}"] = norm
                context.log.info(f"query iHVPs for {m}: {len(qids)} queries, ‖·‖ = {norm:.4g}")
        answers, correct = _answers(ft, q, cfg)
        table = pd.DataFrame({
            "query_id": q.query_id, "prompt": q.prompt.astype(str), "completion": q.completion.astype(str),
            "true_doc_ids": ([None if not isinstance(x, (list, np.ndarray)) else [str(d) for d in x]
                              for x in q.true_doc_ids] if "true_doc_ids" in q else [None] * len(q)),
            "answer": answers, "answer_correct": correct, "scored": q.query_id.isin(set(qids))})
        write_parquet_atomic(_with_list_type(table), layout.queries)
        md["seconds"] = round(t.seconds, 3)
        if any(c is not None for c in correct):
            md["answer_accuracy"] = float(np.mean([bool(c) for c in correct if c is not None]))
        md["answers"] = dg.MetadataValue.md(md_table(table[["query_id", "prompt", "completion", "answer"]].head(10)))
        return dg.MaterializeResult(metadata=md)

    out.append(query_ihvps)

    # -------------------------------------------------------------------------------- scores
    @asset("influence_scores", "scores",
           f"Scores of every candidate document of this shard for every query, methods {list(methods)} "
           "(positive = supports the completion; shard_rank 1 = most supporting in the shard).", heavy=True,
           kinds={"pytorch", "parquet"})
    def influence_scores(context: dg.AssetExecutionContext, device: DeviceResource) -> dg.MaterializeResult:
        key = context.partition_key
        docs = _documents(layout, key)
        cands = read_parquet_checked(layout.candidates(key), f"candidates of {key}", _fix("candidates", key),
                                     ("query_id", "doc_id", "distance"))
        qtab = _queries_table(layout)
        t = Timer()
        table, md = score_shard(cfg, layout, stages(device), docs, cands, qtab, key, model_versions())
        bad = int((~np.isfinite(table.score.to_numpy(dtype=float))).sum())
        if bad:
            context.log.warning(f"{key}: {bad} non-finite scores (see the scores_finite check)")
        path = write_parquet_atomic(table, layout.scores(key), schema=SCORES_SCHEMA)
        md.update({"rows": len(table), "dagster/row_count": len(table), "seconds": round(t.seconds, 3),
                   "path": dg.MetadataValue.path(str(path)), "non_finite_scores": bad})
        first = table[(table.query_id == table.query_id.iloc[0]) & (table.shard_rank <= 5)] if len(table) else table
        md["top_in_shard_for_first_query"] = dg.MetadataValue.md(
            md_table(first[["method", "shard_rank", "doc_id", "score"]].sort_values(["method", "shard_rank"])))
        return dg.MaterializeResult(metadata=md)

    out.append(influence_scores)

    # -------------------------------------------------------------------------------- SQL + reports
    @asset("score_tables", "reports",
           f"{layout.database}: DuckDB views documents, queries, candidates, influence_scores (global rank), "
           "top_influences.", kinds={"duckdb"})
    def score_tables(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        t = Timer()
        keys = sorted(context.instance.get_dynamic_partitions(CORPUS_PARTITIONS.name))
        missing = [k for k in keys if not layout.scores(k).exists()]
        if missing:
            raise dg.Failure(f"influence_scores partitions {missing} have no table yet; materialise them first")
        create_database(layout)
        con = connect(layout)
        try:
            stats = con.execute("SELECT count(*), count(DISTINCT query_id), count(DISTINCT doc_id), "
                                "count(DISTINCT method) FROM influence_scores_by_shard").fetchone()
            per_method = con.execute("SELECT method, count(*) AS rows, avg(score) AS mean_score, "
                                     "min(score) AS min_score, max(score) AS max_score FROM influence_scores_by_shard "
                                     "GROUP BY method ORDER BY method").df()
            top = con.execute("SELECT query_id, method, rank, doc_id, score, left(text, 80) AS text "
                              "FROM top_influences WHERE query_id = (SELECT min(query_id) FROM queries WHERE scored) "
                              "AND rank <= 3 ORDER BY method, rank").df()
        finally:
            con.close()
        return dg.MaterializeResult(metadata={
            "rows": stats[0], "queries": stats[1], "documents": stats[2], "methods": stats[3], "shards": len(keys),
            "seconds": round(t.seconds, 3), "database": dg.MetadataValue.path(str(layout.database)),
            "try": dg.MetadataValue.md(f"`duckdb {layout.database}` then `SELECT * FROM top_influences LIMIT 10;`"),
            "per_method": dg.MetadataValue.md(md_table(per_method)),
            "top_3_first_query": dg.MetadataValue.md(md_table(top))})

    out.append(score_tables)

    @asset("attribution_report", "reports", "Top documents per query with their text (Markdown) and a plot (PNG).",
           kinds={"markdown", "png"})
    def attribution_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from .report import build_report

        md, png, stats = build_report(layout, cfg)
        write_text_atomic(md, layout.reports / "attribution_report.md")
        write_text_atomic(png, layout.reports / "attribution_report.png")
        b64 = base64.b64encode(png).decode()
        return dg.MaterializeResult(metadata={
            **stats, "report": dg.MetadataValue.md(md + f"\n\n![plot](data:image/png;base64,{b64})\n"),
            "markdown": dg.MetadataValue.path(str(layout.reports / "attribution_report.md")),
            "plot": dg.MetadataValue.path(str(layout.reports / "attribution_report.png"))})

    out.append(attribution_report)

    if "attribution_quality" in deps_table:
        @asset("attribution_quality", "reports",
               "MRR and Recall@10 per method against the queries' true_doc_ids (sql/quality.sql).",
               kinds={"duckdb", "parquet"})
        def attribution_quality(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            con = connect(layout)
            try:
                q = run_named(con, "quality")
            finally:
                con.close()
            q["candidates"] = str(cfg.scores.candidates)
            write_parquet_atomic(q, layout.quality)
            md: dict[str, Any] = {"quality": dg.MetadataValue.md(md_table(q)), "queries": int(q.n_queries.max())
                                  if len(q) else 0, "path": dg.MetadataValue.path(str(layout.quality))}
            for r in q.itertuples():
                md[f"mrr/{r.method}"] = float(r.mrr)
                md[f"recall_at_10/{r.method}"] = float(r.recall_at_k)
            return dg.MaterializeResult(metadata=md)

        out.append(attribution_quality)
    return out


# ----------------------------------------------------------------------------------------------- pieces

def _factor_metadata(factors, seconds: float, path: Path) -> dict[str, Any]:
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


def _with_list_type(df: pd.DataFrame):
    import pyarrow as pa

    schema = pa.schema([("query_id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
                        ("true_doc_ids", pa.list_(pa.string())), ("answer", pa.string()),
                        ("answer_correct", pa.bool_()), ("scored", pa.bool_())])
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


def _answers(ft, q: pd.DataFrame, cfg: ExperimentConfig) -> tuple[list[str | None], list[bool | None]]:
    """The fine-tuned model's greedy answer to each prompt, and whether its first word is the completion's."""
    if ft.loaded.task != "causal_lm" or ft.loaded.tokenizer is None:
        return [None] * len(q), [None] * len(q)
    try:
        from msif_core.training import first_word, greedy_generate
    except ImportError:  # pragma: no cover - training helpers absent
        return [None] * len(q), [None] * len(q)
    prompts = q.prompt.astype(str).tolist()
    try:
        gens = greedy_generate(ft.model, ft.loaded.tokenizer, prompts, max_new_tokens=6)
    except Exception as e:  # noqa: BLE001 - answers are a convenience; scores do not depend on them
        log.warning("could not generate answers: %s", e)
        return [None] * len(q), [None] * len(q)
    correct = [first_word(g) == first_word(str(c)) for g, c in zip(gens, q.completion)]
    return gens, correct


def score_shard(cfg: ExperimentConfig, layout: Layout, stages: tuple, docs: pd.DataFrame, cands: pd.DataFrame,
                qtab: pd.DataFrame, key: str, versions: tuple[str, str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score one shard's candidate pairs with every configured method; the long table and metadata."""
    from msif_core.api import encode_queries
    from msif_core.baselines import bm25_scores, repsim_scores
    from msif_core.data import encode_documents
    from msif_core.query import QueryIHVPs
    from msif_core.scoring import score_documents

    pt, ft = stages
    scored_q = qtab[qtab.scored].reset_index(drop=True)
    cands = cands[cands.query_id.isin(set(scored_q.query_id))]
    need = docs[docs.doc_id.isin(set(cands.doc_id))].reset_index(drop=True)
    enc = encode_documents(pt.loaded.tokenizer, need.text.tolist(), cfg.factors.max_length)
    kept = need.iloc[enc.kept].reset_index(drop=True)
    md: dict[str, Any] = {"candidate_documents": len(need), "scored_documents": len(kept),
                          "dropped_documents": len(need) - len(kept), "queries": len(scored_q),
                          "document_tokens": enc.n_tokens, "truncated_documents": enc.n_truncated}
    frames = []
    dev = next(pt.model.parameters()).device
    for m in cfg.scores.methods:
        t = Timer()
        mlp = mha = None
        if m in GRADIENT_METHODS:
            ih = QueryIHVPs.load(layout.ihvps(m), device=dev)
            qids = list(ih.manifest["query_ids"])
            if set(qids) != set(scored_q.query_id):
                raise CorruptTableError(f"query iHVPs of {m} hold other queries than {layout.queries}. "
                                        f"Fix: {_fix('query_ihvps')}")
            stage = ft if m == "ss_if" else pt
            if m == "ss_if" and ft.loaded.task != "causal_lm":
                raise dg.Failure("ss_if scores documents with θ_ft's language-model loss; a fine-tune with a "
                                 "classification head has none: use ms_if or gdp")
            res = score_documents(stage.model, ih, enc, cfg.factors.batch_size, stage.pad_id)
            s, mlp, mha = res.scores, res.part("mlp"), res.part("mha")
            md[f"docs_per_second/{m}"] = round(res.timings.get("docs_per_s", 0.0), 2)
            md[f"tokens_per_second/{m}"] = round(res.timings.get("tokens", 0) / max(t.seconds, 1e-9), 1)
        elif m == "repsim":
            qenc = encode_queries(ft, scored_q.prompt.tolist(), scored_q.completion.tolist(), cfg.factors.max_length)
            qids = scored_q.query_id.iloc[qenc.kept].tolist()
            s = repsim_scores(ft.model, pt.model, pt.loaded.tokenizer, enc, qenc, batch_size=cfg.factors.batch_size)
        elif m == "bm25":
            qids = scored_q.query_id.tolist()
            s = bm25_scores(docs.text.tolist(), (scored_q.prompt + scored_q.completion).tolist())
            pos = pd.Index(docs.doc_id).get_indexer(kept.doc_id)
            s = s[pos]
        else:  # pragma: no cover - config validation rejects it
            raise ValueError(f"unknown method {m}")
        n, nq = s.shape
        long = pd.DataFrame({
            "query_id": np.repeat(np.asarray(qids, dtype=object), n),
            "doc_id": np.tile(kept.doc_id.to_numpy(dtype=object), nq),
            "method": m, "score": s.T.reshape(-1).astype(float),
            "mlp_score": mlp.T.reshape(-1).astype(float) if mlp is not None else np.nan,
            "mha_score": mha.T.reshape(-1).astype(float) if mha is not None else np.nan})
        frames.append(long.merge(cands[["query_id", "doc_id", "distance"]], on=["query_id", "doc_id"], how="inner"))
        md[f"seconds/{m}"] = round(t.seconds, 3)
    table = pd.concat(frames, ignore_index=True).rename(columns={"distance": "candidate_distance"})
    table = table.sort_values(["query_id", "method", "score", "doc_id"], ascending=[True, True, False, True],
                              na_position="last", kind="mergesort")
    table["shard_rank"] = table.groupby(["query_id", "method"], sort=False).cumcount().astype("int64") + 1
    table["shard"] = key
    dp, df_ = cfg.scores.damping_pretrain, cfg.scores.damping_finetune
    table["damping_pretrain"] = np.where(table.method == "ms_if", str(dp), None)
    table["damping_finetune"] = np.where(table.method.isin(["ms_if", "ss_if"]), str(df_), None)
    table["pretrained_version"], table["finetuned_version"] = versions
    return table[SCORES_SCHEMA.names].reset_index(drop=True), md


__all__ = ["build_assets", "dependency_table", "redundant_deps", "score_shard", "md_table", "SCORES_SCHEMA"]
