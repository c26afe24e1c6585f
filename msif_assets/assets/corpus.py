"""Corpus side: the corpus cut into shards (Parquet), their sentence embeddings (LanceDB) and each query's
candidate documents per shard (``pretraining_corpus[s] → corpus_shards[s] → corpus_embeddings[s] →
candidates[s]``)."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd

from msif_core.retrieval import all_pairs, nearest_pairs

from ..io import CorpusReader, frame_hash, read_parquet_checked, read_records, shard_index, write_parquet_atomic
from ..markdown import md_table
from ..sources import CORPUS_PARTITIONS
from .base import Dep, Step, Timer, asset, fix


def read_documents(step: Step, key: str) -> pd.DataFrame:
    """Shard ``key``'s documents (doc_id, text, ...), or an error naming the file and the fix."""
    return read_parquet_checked(step.layout.documents(key), f"corpus shard {key}", fix("corpus_shards", key),
                                ("doc_id", "text"))


def read_queries(step: Step) -> pd.DataFrame:
    """The experiment's queries (query_id as strings)."""
    q = read_records(step.cfg.queries, "queries", ("query_id", "prompt", "completion"))
    q["query_id"] = q["query_id"].astype(str)
    return q


@asset("corpus_shards", "corpus", lambda cfg, _: f"The corpus cut into shards of {cfg.shard_size} documents "
       "(Parquet).", deps=["pretraining_corpus"], settings=["shard_size"], partitions=CORPUS_PARTITIONS,
       kinds=["parquet"], outputs=lambda lay, k, _: [lay.documents(k)])
def corpus_shards(step: Step) -> dg.MaterializeResult:
    """One shard of the corpus: its documents in corpus order, with unique doc_ids."""
    key, cfg = step.key, step.cfg
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
    path = write_parquet_atomic(df[["doc_id", "text", "shard", "row"]], step.layout.documents(key))
    step.log.info(f"{key}: {len(df)} documents → {path}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(frame_hash(df, ["doc_id", "text"])),
        metadata={"documents": len(df), "dagster/row_count": len(df), "first_doc_id": str(df.doc_id.iloc[0]),
                  "last_doc_id": str(df.doc_id.iloc[-1]), "mean_characters": float(df.text.str.len().mean()),
                  "seconds": round(t.seconds, 3), "path": dg.MetadataValue.path(str(path)),
                  "preview": dg.MetadataValue.md(md_table(df[["doc_id", "text"]].head(5)))})


@asset("corpus_embeddings", "corpus", lambda _, emb: f"Sentence embeddings of each shard ({emb}) in LanceDB.",
       deps=["corpus_shards"], version_extra=lambda _, emb: emb, partitions=CORPUS_PARTITIONS, kinds=["lancedb"],
       resources=["lakehouse", "embedder"], outputs=lambda lay, k, _: [lay.lancedb / f"{lay.embedding_table(k)}.lance"])
def corpus_embeddings(step: Step) -> dg.MaterializeResult:
    """Unit-norm embeddings of one shard's documents, one LanceDB table per shard."""
    import pyarrow as pa

    key = step.key
    df = read_documents(step, key)
    t = Timer()
    vecs = step.embedder.encode(df.text.tolist())
    secs = t.seconds
    dim = vecs.shape[1]
    table = pa.table({"doc_id": pa.array(df.doc_id.astype(str)), "shard": pa.array([key] * len(df)),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim)})
    uri = step.lakehouse.write_embeddings(key, table)
    step.log.info(f"{key}: embedded {len(df)} documents in {secs:.1f}s ({len(df) / max(secs, 1e-9):.0f}/s)")
    return dg.MaterializeResult(metadata={
        "documents": len(df), "dimensions": dim, "model": step.embedder.model_name, "seconds": round(secs, 3),
        "documents_per_second": round(len(df) / max(secs, 1e-9), 1), "table": uri})


def _describe_candidates(cfg, _) -> str:
    k = cfg.scores.candidates
    return "Documents each query scores in this shard: " + (
        "all of them, at their cosine distance." if k == "all" else
        f"its top {cfg.index.rerank} by the influence index (with their embedding cosine distance)." if k == "index"
        else f"its {k} nearest by cosine similarity (LanceDB).")


def _by_index(cfg) -> bool:
    return cfg.scores.candidates == "index"


def cosine_distances(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """[Q, N] cosine distances 1 - cos (LanceDB's "cosine" distance type), query-major like ``all_pairs``."""
    qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    dn = docs / np.maximum(np.linalg.norm(docs, axis=1, keepdims=True), 1e-12)
    return 1.0 - qn @ dn.T


@asset("candidates", "corpus", _describe_candidates,
       deps=["corpus_embeddings", "queries", Dep("influence_index", when=_by_index),
             Dep("query_vectors", when=_by_index)],
       settings=["scores.candidates"], partitions=CORPUS_PARTITIONS,
       version_extra=lambda cfg, emb: f"{emb} distances" + (f" index rerank={cfg.index.rerank}"
                                                            + (" cosine" if cfg.index.cosine else "")
                                                            if _by_index(cfg) else ""),
       kinds=["lancedb", "parquet"], resources=["lakehouse", "embedder"], outputs=lambda lay, k, _: [lay.candidates(k)])
def candidates(step: Step) -> dg.MaterializeResult:
    """(query, document) pairs to score in one shard: all of them, each query's nearest documents, or its
    top documents by the influence index (``candidates = "index"``: the exact methods then rerank those)."""
    key, k = step.key, step.cfg.scores.candidates
    t = Timer()
    q = read_queries(step)
    tbl = step.lakehouse.embeddings(key, fix("corpus_embeddings", key))
    vecs = step.embedder.encode((q.prompt.astype(str) + q.completion.astype(str)).tolist())
    if k == "index":  # each query's top documents by the influence index, at their embedding distance
        from .index import index_candidates

        qids, pos, _, doc_ids = index_candidates(step, key)
        arrow = tbl.to_arrow()
        col = arrow.column("vector").combine_chunks()
        emb = col.flatten().to_numpy().reshape(len(col), -1).astype(np.float64)
        qpos = pd.Index(q.query_id).get_indexer(qids)
        dist = cosine_distances(np.asarray(vecs, dtype=np.float64)[qpos], emb)  # [Q, N embedded]
        chosen = np.asarray(doc_ids, dtype=object)[pos]  # [Q, K]
        at = pd.Index(arrow.column("doc_id").to_pylist()).get_indexer(chosen.ravel()).reshape(chosen.shape)
        df = pd.DataFrame({"query_id": np.repeat(np.asarray(qids, dtype=object), pos.shape[1]),
                           "doc_id": chosen.ravel(),
                           "distance": np.take_along_axis(dist, at, axis=1).ravel(),
                           "neighbour_rank": np.tile(np.arange(1, pos.shape[1] + 1), len(qids))})
    elif k == "all":  # every pair, at its cosine distance (the retriever method ranks by it)
        arrow = tbl.to_arrow()
        col = arrow.column("vector").combine_chunks()  # fixed-size lists: one flat buffer, no Python lists
        docs = col.flatten().to_numpy().reshape(len(col), -1).astype(np.float64)
        df = all_pairs(q.query_id.tolist(), arrow.column("doc_id").to_pylist())
        df["distance"] = cosine_distances(np.asarray(vecs, dtype=np.float64), docs).ravel()
    else:
        res = (tbl.search([v for v in vecs]).distance_type("cosine").limit(int(k)).select(["doc_id", "_distance"])
               .to_arrow().to_pandas())
        if "query_index" not in res.columns:  # a single query comes back without its index
            res["query_index"] = 0
        df = nearest_pairs(q.query_id.tolist(), res.query_index.to_numpy(), res.doc_id.to_numpy(),
                           res._distance.to_numpy())
    df["shard"] = key
    path = write_parquet_atomic(df, step.layout.candidates(key))
    return dg.MaterializeResult(metadata={
        "pairs": len(df), "dagster/row_count": len(df), "queries": int(df.query_id.nunique()),
        "documents": int(df.doc_id.nunique()), "per_query": str(k), "seconds": round(t.seconds, 3),
        "path": dg.MetadataValue.path(str(path))})


NODES = (corpus_shards, corpus_embeddings, candidates)
