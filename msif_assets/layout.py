"""Where each asset's files live under the lakehouse root."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Paths of every table, factor file and report under ``root``."""

    root: Path

    @property
    def tables(self) -> Path:
        """Parquet tables."""
        return self.root / "tables"

    def documents(self, key: str) -> Path:
        """``corpus_shards`` partition ``key``."""
        return self.tables / "documents" / f"{key}.parquet"

    def candidates(self, key: str) -> Path:
        """``candidates`` partition ``key``."""
        return self.tables / "candidates" / f"{key}.parquet"

    def scores(self, key: str) -> Path:
        """``influence_scores`` partition ``key``."""
        return self.tables / "influence_scores" / f"{key}.parquet"

    @property
    def queries(self) -> Path:
        """Queries with the fine-tuned model's answers (written by ``query_ihvps``)."""
        return self.tables / "queries.parquet"

    @property
    def quality(self) -> Path:
        """``attribution_quality``."""
        return self.tables / "attribution_quality.parquet"

    @property
    def lancedb(self) -> Path:
        """The LanceDB database of ``corpus_embeddings`` (one table per shard)."""
        return self.root / "lancedb"

    @staticmethod
    def embedding_table(key: str) -> str:
        """LanceDB table name of shard ``key``."""
        return f"corpus_embeddings_{key}"

    @staticmethod
    def index_table(key: str) -> str:
        """LanceDB table name of shard ``key``'s influence index vectors."""
        return f"influence_index_{key}"

    def index_manifest(self, key: str) -> Path:
        """What shard ``key``'s influence index was built for (:func:`msif_core.index.index_manifest`)."""
        return self.root / "index" / f"{key}.json"

    @property
    def query_vectors(self) -> Path:
        """The queries' index vectors ψ (``query_vectors``: .npy, with a .json of ids and manifest)."""
        return self.root / "index" / "query_vectors.npy"

    def query_vectors_of(self, method: str) -> Path:
        """The queries' index vectors of ``method`` (``ms_if``: :attr:`query_vectors`; ``gdp``: beside it)."""
        return self.query_vectors if method == "ms_if" else self.query_vectors.with_name(f"query_vectors_{method}.npy")

    def covariance_sums(self, key: str) -> Path:
        """Partial covariance sums of one pre-training shard."""
        return self.root / "factors" / "pretrain_partial" / f"covariance_{key}.safetensors"

    def lambda_sums(self, key: str) -> Path:
        """Partial Λ sums of one pre-training shard."""
        return self.root / "factors" / "pretrain_partial" / f"lambda_{key}.safetensors"

    @property
    def eigenbasis(self) -> Path:
        """Pre-training eigenbasis (Q_A, Q_S)."""
        return self.root / "factors" / "pretrain_eigenbasis.safetensors"

    @property
    def pretrain_factors(self) -> Path:
        """Pre-training EK-FAC factors (a folder)."""
        return self.root / "factors" / "pretrain"

    @property
    def finetune_factors(self) -> Path:
        """Fine-tuning EK-FAC factors (a folder)."""
        return self.root / "factors" / "finetune"

    def ihvps(self, method: str) -> Path:
        """Query iHVPs of one gradient method (a folder)."""
        return self.root / "ihvps" / method

    @property
    def reports(self) -> Path:
        """Markdown and PNG reports."""
        return self.root / "reports"

    @property
    def database(self) -> Path:
        """The DuckDB file with views over the tables."""
        return self.root / "msif.duckdb"

    def remove_shard(self, key: str) -> None:
        """Delete every file of a shard that left the corpus (its tables, partial sums, embeddings, index)."""
        for p in (self.documents(key), self.candidates(key), self.scores(key), self.covariance_sums(key),
                  self.lambda_sums(key), self.index_manifest(key)):
            p.unlink(missing_ok=True)
        for table in (self.embedding_table(key), self.index_table(key)):
            shutil.rmtree(self.lancedb / f"{table}.lance", ignore_errors=True)
