"""Dagster assets of msif: thin wrappers that call ``msif_core`` and write the lakehouse.

- :mod:`.sources` — observable checkpoints and data sets, shard partitions, the source sensor;
- :mod:`.assets` — the derived assets (corpus shards → embeddings → candidates; pre-train EK-FAC
  map-reduce; fine-tune factors; query iHVPs; influence scores; DuckDB views; report; quality);
- :mod:`.checks` — asset checks; :mod:`.views` — ``msif.duckdb`` and the named SQL queries;
- :mod:`.runner` — the in-process driver behind ``msif run``; :mod:`.build` — ``build_definitions``.
"""

from .io import CorruptTableError

__all__ = ["CorruptTableError"]
