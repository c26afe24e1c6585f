"""Files of the lakehouse: atomic Parquet writes, checked reads, content hashes, the corpus reader.

Every table is written to a temporary file in the same folder and renamed into place, so a reader sees
the old file or the new one, never half of one, and a failed step leaves the previous table intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


class CorruptTableError(RuntimeError):
    """A Parquet or JSONL file that cannot be read; the message names the file and the fix."""


def shard_key(index: int) -> str:
    """Partition key of corpus shard ``index``."""
    return f"shard_{index:05d}"


def shard_index(key: str) -> int:
    """Inverse of :func:`shard_key`."""
    if not key.startswith("shard_"):
        raise ValueError(f"not a shard partition key: {key!r}")
    return int(key[len("shard_"):])


def write_parquet_atomic(table: pa.Table | pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> Path:
    """Write ``table`` to ``path`` through a temporary file and a rename (atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(text: str | bytes, path: Path) -> Path:
    """Write text (or bytes) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)
    return path


def read_parquet_checked(path: Path, what: str, fix: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a Parquet file, turning a missing or corrupt file into a :class:`CorruptTableError`.

    Args:
        path: the file.
        what: what the file holds ("corpus shard shard_00001"), for the message.
        fix: what to do about it ("rematerialise corpus_shards partition shard_00001").
        columns: columns that must be present (all columns are read).
    """
    path = Path(path)
    if not path.exists():
        raise CorruptTableError(f"{what}: {path} does not exist. Fix: {fix}")
    try:
        df = pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptTableError(f"{what}: {path} is not a readable Parquet file ({type(e).__name__}: {e}). "
                                f"Fix: {fix}") from e
    if columns:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise CorruptTableError(f"{what}: {path} lacks column(s) {missing} (has {list(df.columns)}). Fix: {fix}")
    return df


def read_records(path: Path, what: str, columns: Sequence[str]) -> pd.DataFrame:
    """A JSONL or Parquet table of records with at least ``columns`` (a clear error otherwise)."""
    path = Path(path)
    fix = f"repair or regenerate {path}"
    if path.suffix in (".jsonl", ".json"):
        rows = []
        line_no = 0
        try:
            with path.open("rb") as fh:
                for raw in fh:
                    line_no += 1
                    line = raw.decode("utf-8")
                    if line.strip():
                        rows.append(json.loads(line))
        except UnicodeDecodeError as e:
            raise CorruptTableError(f"{what}: {path} line {line_no} is not UTF-8 text ({e.reason} at byte {e.start} "
                                    f"of the line). Fix: {fix}") from e
        except (OSError, json.JSONDecodeError) as e:
            raise CorruptTableError(f"{what}: {path} line {line_no} is not valid JSON ({e}). Fix: {fix}") from e
        df = pd.DataFrame(rows)
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise CorruptTableError(f"{what}: {path} lacks field(s) {missing}. Fix: {fix}")
        return df
    return read_parquet_checked(path, what, fix, columns)


# ----------------------------------------------------------------------------------------------- hashes

def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


_FILE_HASHES: dict[str, str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (cached per process by path, size and modification time)."""
    key = _stat_key(path)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with Path(path).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def tree_hash(paths: Iterable[Path], base: Path | None = None) -> str:
    """Content hash of files (and of every file under folders), with their relative names."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
        for f in files:
            rel = f.relative_to(base or (p if p.is_dir() else p.parent))
            h.update(str(rel).encode() + b"\0" + file_hash(f).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def frame_hash(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """Content hash of the given columns of a table (row order matters)."""
    h = hashlib.sha256()
    for c in columns:
        h.update(c.encode() + b"\0")
        h.update(pd.util.hash_pandas_object(df[c].astype(str), index=False).values.tobytes())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------- corpus

class CorpusReader:
    """Rows of a corpus spread over sorted Parquet (or JSONL) files, addressed by global row number.

    Shard ``i`` is rows ``[i * shard_size, (i + 1) * shard_size)``. Parquet row counts come from file
    footers, so locating a shard reads only the files that overlap it. Per-row content digests are
    cached by (file, size, mtime) so observing an unchanged corpus rereads nothing.
    """

    _ROW_DIGESTS: dict[str, np.ndarray] = {}

    def __init__(self, files: Sequence[Path], shard_size: int) -> None:
        self.files = [Path(f) for f in files]
        self.shard_size = shard_size
        self._counts: list[int] | None = None

    @property
    def counts(self) -> list[int]:
        """Rows per file."""
        if self._counts is None:
            counts = []
            for f in self.files:
                if f.suffix in (".jsonl", ".json"):
                    with f.open("rb") as fh:
                        counts.append(sum(1 for line in fh if line.strip()))
                else:
                    try:
                        counts.append(pq.ParquetFile(f).metadata.num_rows)
                    except (pa.ArrowException, OSError) as e:
                        raise CorruptTableError(
                            f"pre-training corpus: {f} is not a readable Parquet file ({e}). Fix: repair or "
                            f"regenerate it, or remove it from [data] pretraining_corpus") from e
            self._counts = counts
        return self._counts

    @property
    def n_rows(self) -> int:
        """Documents in the corpus."""
        return sum(self.counts)

    @property
    def n_shards(self) -> int:
        """Shards of ``shard_size`` documents (the last one may be smaller)."""
        return -(-self.n_rows // self.shard_size)

    def _read_file(self, f: Path) -> pd.DataFrame:
        df = read_records(f, "pre-training corpus", ("doc_id", "text"))
        return pd.DataFrame({"doc_id": df["doc_id"].astype(str), "text": df["text"].astype(str)})

    def _read_range(self, f: Path, lo: int, hi: int) -> pd.DataFrame:
        """Rows ``[lo, hi)`` of one file; for Parquet only the row groups that hold them are read."""
        if f.suffix in (".jsonl", ".json"):
            return self._read_file(f).iloc[lo:hi]
        try:
            pf = pq.ParquetFile(f)
            groups, first, offset = [], None, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset < hi and offset + n > lo:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            missing = [c for c in ("doc_id", "text") if c not in pf.schema_arrow.names]
            if missing:
                raise CorruptTableError(f"pre-training corpus: {f} lacks column(s) {missing}. Fix: the corpus "
                                        f"needs doc_id and text columns")
            table = pf.read_row_groups(groups, columns=["doc_id", "text"]).to_pandas()
        except (pa.ArrowException, OSError) as e:
            raise CorruptTableError(f"pre-training corpus: {f} is not a readable Parquet file ({e}). Fix: repair "
                                    f"or regenerate it, or remove it from [data] pretraining_corpus") from e
        df = table.iloc[lo - first:hi - first]
        return pd.DataFrame({"doc_id": df["doc_id"].astype(str), "text": df["text"].astype(str)})

    def read_rows(self, start: int, stop: int) -> pd.DataFrame:
        """Rows ``[start, stop)`` as a DataFrame with ``doc_id``, ``text``, ``row`` (global row number)."""
        parts, offset = [], 0
        for f, n in zip(self.files, self.counts):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                df = self._read_range(f, lo - offset, hi - offset)
                parts.append(df.reset_index(drop=True).assign(row=np.arange(lo, hi)))
            offset += n
        if not parts:
            return pd.DataFrame({"doc_id": pd.Series(dtype=str), "text": pd.Series(dtype=str),
                                 "row": pd.Series(dtype="int64")})
        return pd.concat(parts, ignore_index=True)

    def read_shard(self, index: int) -> pd.DataFrame:
        """The documents of shard ``index``."""
        return self.read_rows(index * self.shard_size, (index + 1) * self.shard_size)

    def _digests(self, f: Path) -> np.ndarray:
        key = _stat_key(f)
        if key not in self._ROW_DIGESTS:
            df = self._read_file(f)
            self._ROW_DIGESTS[key] = pd.util.hash_pandas_object(df[["doc_id", "text"]], index=False).values
        return self._ROW_DIGESTS[key]

    def shard_versions(self) -> dict[str, str]:
        """Content hash of each shard, by partition key."""
        digests = np.concatenate([self._digests(f) for f in self.files]) if self.files else np.zeros(0, np.uint64)
        out = {}
        for i in range(self.n_shards):
            chunk = digests[i * self.shard_size:(i + 1) * self.shard_size]
            out[shard_key(i)] = "sha256:" + hashlib.sha256(chunk.tobytes()).hexdigest()
        return out
