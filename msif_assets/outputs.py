"""What each materialisation wrote, recorded so that a deleted or altered file is noticed.

Every asset records, in its materialisation metadata under ``msif/outputs``, a fingerprint of each file
it wrote (paths relative to the lakehouse root): the size and a SHA-256 of the whole file, or of its
first and last 4 MiB for larger files (a truncated file changes its size; Parquet and safetensors keep
their footer and header there). A folder is fingerprinted file by file. :func:`problems` compares the
files with a record; :func:`stale_units` does so for the latest materialisation of every asset
partition in an instance: ``msif run`` recomputes those (one line each says why), and the
``outputs_intact`` asset check reports them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import dagster as dg

OUTPUTS_KEY = "msif/outputs"
ROOT_KEY = "msif/root"  # the lakehouse root the asset wrote under (msif.duckdb's views hold absolute paths)
ROOT_BOUND = ("score_tables",)  # assets whose files name the root itself
_WHOLE = 8 * 2**20
_PART = 4 * 2**20


def file_fingerprint(path: Path) -> str:
    """``size:<bytes>:<sha256>`` of the whole file, or of its first and last 4 MiB when it is larger."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= _WHOLE:
            h.update(fh.read())
        else:
            h.update(fh.read(_PART))
            fh.seek(size - _PART)
            h.update(fh.read(_PART))
    return f"size:{size}:{h.hexdigest()}"


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [path]


def fingerprint(paths: Iterable[Path], root: Path) -> dict[str, str]:
    """Relative path → fingerprint of every file under ``paths`` (files, or folders file by file)."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p} was not written")
        for f in _files(p):
            out[str(f.relative_to(root))] = file_fingerprint(f)
    return out


def problems(recorded: Mapping[str, str], root: Path) -> list[str]:
    """Files of a record that are now missing or differ (each a phrase naming the path)."""
    root = Path(root)
    out = []
    for rel, want in recorded.items():
        f = root / rel
        if not f.is_file():
            out.append(f"{f} is missing")
            continue
        got = file_fingerprint(f)
        if got != want:
            size = got.split(":")[1]
            out.append(f"{f} was changed ({size} bytes now, {want.split(':')[1]} when written)")
    return out


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> dict | None:
    """The metadata of the latest materialisation of ``key`` (``partition``), or None if it has none."""
    flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition is not None else None)
    recs = instance.fetch_materializations(flt, limit=1, ascending=False).records
    if not recs or recs[0].asset_materialization is None:
        return None
    return dict(recs[0].asset_materialization.metadata)


def stale_units(instance: dg.DagsterInstance, units: Iterable[tuple[dg.AssetKey, str | None]], root: Path,
                expected: Mapping[str, Callable[[str | None], list]] | None = None,
                root_bound: Iterable[str] = ()) -> dict[tuple[dg.AssetKey, str | None], str]:
    """(asset, partition) → why, for every materialised unit whose recorded outputs are missing or
    altered. A materialisation without a record (written by an older msif) is checked for the files
    ``expected[asset](partition)`` says it writes: their absence makes it stale too. The assets in
    ``root_bound`` write the root itself into their files: written under another root (the lakehouse was
    moved or copied), they are stale."""
    out = {}
    bound = set(root_bound)
    for key, part in units:
        md = latest_metadata(instance, key, part)
        if md is None:  # never materialised: missing, not stale
            continue
        if key.to_user_string() in bound and ROOT_KEY in md:
            was = str(md[ROOT_KEY].value)
            if Path(was) != Path(root).resolve():
                out[(key, part)] = f"it was written under {was}, and the lakehouse is now at {Path(root).resolve()}"
                continue
        rec = dict(md[OUTPUTS_KEY].value) if OUTPUTS_KEY in md else None
        if rec:
            found = problems(rec, root)
        elif rec is None and expected and key.to_user_string() in expected:
            found = [f"{p} is missing" for p in expected[key.to_user_string()](part) if not Path(p).exists()]
        else:
            found = []
        if found:
            out[(key, part)] = "; ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")
    return out



def lakehouse_problems(instance: dg.DagsterInstance, cfg, asset_names: Iterable[str]
                       ) -> dict[tuple[dg.AssetKey, str | None], str]:
    """:func:`stale_units` over every current partition of the named assets of ``cfg``'s graph (what
    ``msif run`` recomputes and the ``outputs_intact`` check reports)."""
    from .assets import NODES
    from .layout import Layout

    names, layout = set(asset_names), Layout(cfg.root)
    units, expected = [], {}
    for n in NODES:
        if n.name not in names:
            continue
        parts = sorted(instance.get_dynamic_partitions(n.partitions.name)) if n.partitions is not None else [None]
        units += [(dg.AssetKey(n.name), p) for p in parts]
        if n.outputs:
            expected[n.name] = lambda part, n=n: n.outputs(layout, part, cfg)
    return stale_units(instance, units, cfg.root, expected, root_bound=ROOT_BOUND)
