"""The pre-training influence index (``[index] dimensions > 0``; :mod:`msif_core.index`):

    corpus_shards[s], pretrained_checkpoint, pretrain_factors → influence_index[s]        (LanceDB)
    queries, finetuned_checkpoint, pretrain_factors, finetune_factors → query_vectors      (.npy)

``influence_index[s]`` holds each document's φ(z) = Π Wᵀ ∇ℓ(z; θ_pt) and depends on nothing of the
fine-tuned side, so a new fine-tuned checkpoint or new queries never rebuild it; ``query_vectors`` holds
each query's ψ(x) (with ``[index] gdp``, also the GDP query vectors Π W⁻¹ ∇m). ``influence_scores[s]`` scores
every document of its shard by ⟨ψ, φ⟩ and keeps each query's top ``[index] keep`` as method ``ms_if_index``
(and ``gdp_index``). Both files carry the manifest of the pre-trained
model, factors, projection and damping they were made with; scoring refuses a pair that disagrees.
"""

from __future__ import annotations

import io
import json

import dagster as dg
import numpy as np
import pandas as pd

from ..io import CorruptTableError, write_text_atomic
from ..sources import CORPUS_PARTITIONS
from .base import FACTOR_SETTINGS, Step, Timer, asset, fix
from .corpus import read_documents

INDEX_SETTINGS = ("index.dimensions", "index.whiten", "index.seed")


def _enabled(cfg) -> bool:
    return cfg.index.enabled


def _damping_version(cfg, _) -> str:
    """The pre-train damping enters the index only when it is whitened."""
    return f"damping_pt={cfg.scores.damping_pretrain}" if cfg.index.whiten else "plain"


def _query_version(cfg, _) -> str:
    """The pre-train damping always enters the query vectors (whitened: (Λ+λ)^(-1/2); plain: all of P_pt), and
    ``[index] gdp`` when on (off leaves the versions of existing lakehouses as they were)."""
    return f"damping_pt={cfg.scores.damping_pretrain}" + ("; gdp" if cfg.index.gdp else "")


def _index_version(cfg, embedder: str) -> str:
    """The damping (whitened only) and the storage dtype."""
    return _damping_version(cfg, embedder) + f"; dtype={cfg.index.dtype}"


def _pretrain_side(step: Step, pt, lazy: bool):
    """The pre-train factors (checked against θ_pt; ``lazy``: read module by module, for a pass that visits
    each module once), the projection and the manifest."""
    import torch

    from msif_core.ekfac import Factors
    from msif_core.index import Projection, index_manifest
    from msif_core.models import fingerprint

    dtype = next(pt.model.parameters()).dtype
    cast = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    ptf = Factors.load(step.layout.pretrain_factors, expect_fingerprint=fingerprint(pt.model, pt.specs), dtype=cast,
                       lazy=lazy)
    specs = [s for s in pt.specs if s.name in ptf.specs]
    proj = Projection(specs, step.cfg.index.dimensions, seed=step.cfg.index.seed)
    return ptf, specs, proj, index_manifest(ptf, proj, step.cfg.scores.damping_pretrain, step.cfg.index.whiten)


@asset("influence_index", "index",
       lambda cfg, _: f"Each document's influence index vector φ = Π Wᵀ ∇ℓ(z; θ_pt), {cfg.index.dimensions} "
       f"numbers ({'whitened' if cfg.index.whiten else 'plain'}, seed {cfg.index.seed}), in LanceDB: built once "
       "per pre-trained model, never by a new fine-tune.",
       deps=["corpus_shards", "pretrained_checkpoint", "pretrain_factors"],
       settings=[*INDEX_SETTINGS, *FACTOR_SETTINGS], version_extra=_index_version, partitions=CORPUS_PARTITIONS,
       kinds=["pytorch", "lancedb"], heavy=True, resources=["lakehouse", "device"], when=_enabled,
       outputs=lambda lay, k, _: [lay.lancedb / f"{lay.index_table(k)}.lance", lay.index_manifest(k)])
def influence_index(step: Step) -> dg.MaterializeResult:
    """One shard's index vectors (doc_id, vector, sq_norm = ∇ℓᵀ P_pt ∇ℓ when whitened, loss; with
    ``[index] dtype = "float16"`` unit rows and their ``norm``) and manifest."""
    import pyarrow as pa

    from msif_core.data import encode_documents
    from msif_core.index import document_vectors, encode_rows

    key, cfg, layout = step.key, step.cfg, step.layout
    docs = read_documents(step, key)
    pt, _ = step.stages()
    ptf, specs, proj, manifest = _pretrain_side(step, pt, lazy=False)  # every batch visits every module
    enc = encode_documents(pt.loaded.tokenizer, docs.text.tolist(), cfg.factors.max_length)
    kept = docs.iloc[enc.kept].reset_index(drop=True)
    t = Timer()
    dv = document_vectors(pt.model, specs, enc, ptf, proj, cfg.scores.damping_pretrain, cfg.index.whiten,
                          cfg.factors.batch_size, pt.pad_id)
    secs = t.seconds
    k = proj.dimensions
    stored, norms = encode_rows(dv.vectors, cfg.index.dtype)
    columns = {"doc_id": pa.array(kept.doc_id.astype(str)),
               "vector": pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), k),
               "sq_norm": pa.array(dv.sq_norms), "loss": pa.array(dv.losses)}
    if norms is not None:
        columns["norm"] = pa.array(norms)
    table = pa.table(columns)
    manifest = manifest | {"dtype": cfg.index.dtype}
    (layout.index_manifest(key)).unlink(missing_ok=True)  # no manifest until the vectors are complete
    uri = step.lakehouse.write_lance(layout.index_table(key), table)
    write_text_atomic(json.dumps(manifest | {"documents": len(kept)}, indent=1), layout.index_manifest(key))
    step.log.info(f"{key}: index vectors of {len(kept)} documents, {k} numbers each, in {secs:.1f}s "
                  f"({len(kept) / max(secs, 1e-9):.1f} docs/s)")
    return dg.MaterializeResult(metadata={
        "documents": len(kept), "dagster/row_count": len(kept), "dropped_documents": len(docs) - len(kept),
        "dimensions": k, "whiten": cfg.index.whiten, "seed": cfg.index.seed, "seconds": round(secs, 3),
        "documents_per_second": round(len(kept) / max(secs, 1e-9), 2), "table": uri,
        "dtype": cfg.index.dtype, "mib": round(stored.nbytes / 2**20, 2)})


@asset("query_vectors", "queries",
       lambda cfg, _: "Each query's influence index vector ψ = Π Wᵀ P_ft ∇m(x; θ_ft) (measurement gradients on "
       "the fine-tuned model, preconditioned by P_ft, whitened and projected like the documents)"
       + ("; and its GDP vector Π W⁻¹ ∇m (method gdp_index)" if cfg.index.gdp else "") + ".",
       deps=["queries", "finetuned_checkpoint", "pretrain_factors", "finetune_factors"],
       settings=[*INDEX_SETTINGS, *FACTOR_SETTINGS, "scores.damping_finetune"],
       version_extra=_query_version, kinds=["pytorch", "numpy"], heavy=True, resources=["lakehouse", "device"],
       when=_enabled, outputs=lambda lay, k, cfg: [lay.query_vectors_of(m) for m in _query_methods(cfg)]
       + [lay.query_vectors.with_suffix(".json")])
def query_vectors(step: Step) -> dg.MaterializeResult:
    """ψ of every query that has a completion token within max_length, a slice of queries at a time; with
    ``[index] gdp`` the GDP query vectors too, from the same measurement gradients."""
    import torch

    from msif_core.api import encode_queries
    from msif_core.ekfac import Factors
    from msif_core.index import query_vectors as vectors
    from msif_core.models import fingerprint
    from msif_core.query import QUERY_SLICE, measurement_gradients

    from .corpus import read_queries

    cfg, layout = step.cfg, step.layout
    pt, ft = step.stages()
    ptf, specs, proj, manifest = _pretrain_side(step, pt, lazy=True)  # module by module
    dtype = next(ft.model.parameters()).dtype
    cast = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    ftf = Factors.load(layout.finetune_factors, expect_fingerprint=fingerprint(ft.model, ft.specs), dtype=cast,
                       lazy=True)
    q = read_queries(step)
    qenc = encode_queries(ft, q.prompt.astype(str).tolist(), q.completion.tolist(), cfg.factors.max_length)
    qids = q.query_id.iloc[qenc.kept].tolist()
    if not qids:
        raise dg.Failure(f"{cfg.queries}: no query has a completion token within max_length="
                         f"{cfg.factors.max_length}; give the queries non-empty completions")
    t = Timer()
    methods = _query_methods(cfg)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for lo in range(0, len(qids), QUERY_SLICE):
        sl = qenc.subset(range(lo, min(lo + QUERY_SLICE, len(qids))))
        grads = measurement_gradients(ft.model, specs, sl, cfg.factors.batch_size, ft.pad_id)
        for m in methods:
            parts[m].append(vectors(grads, specs, ftf, ptf, proj, cfg.scores.damping_finetune,
                                    cfg.scores.damping_pretrain, cfg.index.whiten, method=m).astype(np.float32))
        del grads
    layout.query_vectors.with_suffix(".json").unlink(missing_ok=True)  # no ids until every file is complete
    for m in ("ms_if", "gdp"):
        if m not in methods:  # an earlier run's vectors of a method now off: never read as current
            layout.query_vectors_of(m).unlink(missing_ok=True)
    for m in methods:
        buf = io.BytesIO()
        np.save(buf, np.concatenate(parts[m]))
        write_text_atomic(buf.getvalue(), layout.query_vectors_of(m))
    write_text_atomic(json.dumps({"manifest": manifest, "query_ids": qids, "methods": list(methods)}, indent=1),
                      layout.query_vectors.with_suffix(".json"))
    return dg.MaterializeResult(metadata={"queries": len(qids), "dimensions": proj.dimensions,
                                          "seconds": round(t.seconds, 3),
                                          "path": dg.MetadataValue.path(str(layout.query_vectors))})


def _query_methods(cfg) -> tuple[str, ...]:
    """The methods whose query vectors ``query_vectors`` writes, one per index method (ms_if_index → ms_if, and
    gdp_index → gdp with ``[index] gdp``)."""
    return tuple(m.removesuffix("_index") for m in cfg.index.methods)


def read_query_vectors(step: Step, method: str = "ms_if") -> tuple[np.ndarray, list[str], dict]:
    """(ψ [Q, k] of ``method``, query ids, manifest) as ``query_vectors`` wrote them, or an error naming the
    fix."""
    layout = step.layout
    meta_path = layout.query_vectors.with_suffix(".json")
    path = layout.query_vectors_of(method)
    try:
        meta = json.loads(meta_path.read_text())
        psi = np.load(path)
    except (OSError, ValueError) as e:
        raise CorruptTableError(f"query index vectors {path} (or {meta_path.name}) are missing or "
                                f"unreadable ({e}). Fix: {fix('query_vectors')}") from e
    if method not in meta.get("methods", ["ms_if"]):
        raise CorruptTableError(f"{meta_path} lists no {method} query vectors (methods {meta.get('methods')}): "
                                f"{path} is left from another run. Fix: {fix('query_vectors')}")
    if psi.shape[0] != len(meta.get("query_ids", [])):
        raise CorruptTableError(f"{path} holds {psi.shape[0]} vectors for "
                                f"{len(meta.get('query_ids', []))} query ids. Fix: {fix('query_vectors')}")
    return psi, list(meta["query_ids"]), meta["manifest"]


def load_index(step: Step, key: str, what: str, cosine: bool | None = None
               ) -> tuple[np.ndarray, np.ndarray | None, list[str], np.ndarray, list[str], dict]:
    """(φ [N, k] as stored, its row scale (float16 unit rows: their norms; None: float32 rows), doc ids,
    ψ [Q, k], query ids, manifest) of shard ``key``, after checking that the shard's index and the query
    vectors were made for the same model, factors, projection and damping; errors say which file and the
    fix. ``what`` names the asset that reads them. The scale is that of the rows as scored: with ``cosine``
    (default ``[index] cosine``) every row of unit length (:func:`msif_core.index.score_scale`), else the rows
    as built."""
    from msif_core.index import IndexMismatchError, check_manifest, score_scale

    layout = step.layout
    psi, qids, expected = read_query_vectors(step)
    where = f"influence index of shard {key} ({layout.index_manifest(key)})"
    try:
        found = json.loads(layout.index_manifest(key).read_text())
    except (OSError, ValueError) as e:
        raise CorruptTableError(f"{where} is missing or unreadable ({e}). Fix: {fix('influence_index', key)}") from e
    try:
        check_manifest(found, expected, where)
    except IndexMismatchError as e:
        raise dg.Failure(f"{e}. Fix: {fix('influence_index', key)} and {fix('query_vectors')}") from e
    arrow = step.lakehouse.open_lance(layout.index_table(key), f"{what} {key}", fix("influence_index", key)).to_arrow()
    col = arrow.column("vector").combine_chunks()
    phi = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
    scale = arrow.column("norm").to_numpy() if "norm" in arrow.column_names else None
    if (scale is None) != (found.get("dtype", "float32") == "float32"):
        raise CorruptTableError(f"{where}: the LanceDB table {layout.index_table(key)} does not hold the "
                                f"{found.get('dtype', 'float32')} rows its manifest says. "
                                f"Fix: {fix('influence_index', key)}")
    doc_ids = arrow.column("doc_id").to_pylist()
    if len(doc_ids) != found.get("documents") or phi.shape[1] != expected["dimensions"]:
        raise CorruptTableError(f"{where}: the LanceDB table {layout.index_table(key)} holds {len(doc_ids)} rows of "
                                f"{phi.shape[1]} numbers; its manifest says {found.get('documents')} of "
                                f"{expected['dimensions']}. Fix: {fix('influence_index', key)}")
    cosine = step.cfg.index.cosine if cosine is None else cosine
    return phi, score_scale(phi, scale, cosine), doc_ids, psi, qids, expected


def index_rows(step: Step, key: str, specs) -> pd.DataFrame:
    """Method ``ms_if_index`` (and ``gdp_index`` with ``[index] gdp``) of shard ``key``: every document scored
    by ⟨ψ, φ⟩, each query's top ``[index] keep`` kept (query_id, doc_id, method, score, mlp_score, mha_score;
    ``[index] cosine``: ms_if_index divided by the document vector's norm, gdp_index never): the top by an
    exact float32 search a step of rows at a time, their float64 scores and block-kind parts from those rows
    only."""
    from msif_core.index import Projection, pair_scores, score_scale, search

    phi, plain, doc_ids, psi, qids, expected = load_index(step, key, "influence_scores", cosine=False)
    proj = Projection([s for s in specs if s.name in expected["shapes"]], expected["dimensions_requested"],
                      seed=expected["seed"])
    if proj.manifest()["shapes"] != expected["shapes"]:
        raise dg.Failure(f"influence index of shard {key}: the projection of the current model's modules differs "
                         f"from the one the index was built with. Fix: {fix('influence_index', key)} and "
                         f"{fix('query_vectors')}")
    keep = min(step.cfg.index.keep, len(doc_ids))

    def flat(x: np.ndarray | None) -> np.ndarray | float:
        return np.nan if x is None else x.reshape(-1)

    # plain: the factor that gives the rows as built (float16 unit rows: their stored norms; float32: None)
    ms_scale = score_scale(phi, plain, step.cfg.index.cosine)
    frames = []
    for method in step.cfg.index.methods:
        if method == "ms_if_index":
            q, ids, scale = psi, qids, ms_scale
        else:  # gdp_index: the same manifest (one json), the plain product, never divided by a norm
            q, ids, _ = read_query_vectors(step, "gdp")
            scale = plain
        pos, _ = search(q, phi, keep, row_scale=scale)  # [Q, keep]: the rows as scored (cosine: unit rows)
        scores, parts = pair_scores(q, phi, pos, proj, row_scale=scale)
        frames.append(pd.DataFrame({"query_id": np.repeat(np.asarray(ids, dtype=object), keep),
                                    "doc_id": np.asarray(doc_ids, dtype=object)[pos.reshape(-1)], "method": method,
                                    "score": flat(scores), "mlp_score": flat(parts.get("mlp")),
                                    "mha_score": flat(parts.get("mha"))}))
    return pd.concat(frames, ignore_index=True)


def index_candidates(step: Step, key: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Each query's top ``[index] rerank`` documents of shard ``key`` by index score (exact inner
    products, :func:`msif_core.index.search`): (query ids, positions [Q, K], scores [Q, K], doc ids)."""
    from msif_core.index import search

    phi, scale, doc_ids, psi, qids, _ = load_index(step, key, "candidates")
    pos, scores = search(psi, phi, step.cfg.index.rerank, row_scale=scale)
    return qids, pos, scores, doc_ids


NODES = (influence_index, query_vectors)
