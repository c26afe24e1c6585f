"""Every input check that needs no model, run before any asset does (``msif run``, ``msif ui``, the
Dagster definitions): the experiment file is valid (:mod:`.config`), and

- each checkpoint has a parsable ``config.json``, readable safetensors weights whose shapes agree with
  that config (compared with a model built on the meta device, so nothing is loaded), and tokenizer
  files; ``auto_map`` (custom code) is never run, with a notice;
- every data file parses completely (each JSONL line, each Parquet footer), has its required columns,
  and ids are unique (``doc_id`` across the whole corpus, ``query_id``); the corpus is not empty;
- queries and fine-tuning pairs with an empty completion are named in a warning (they are not scored /
  not fitted on), as are fine-tuning files without a usable pair (an error).

:func:`preflight` raises one :class:`~msif_assets.config.ConfigError` listing every problem, and returns
the notices and warnings to show.
"""

from __future__ import annotations

import pandas as pd

from msif_core.methods import get as get_method

from .config import ConfigError, ExperimentConfig
from .io import CorruptTableError, read_records


def _empty(values: pd.Series) -> pd.Series:
    return values.isna() | (values.astype(str).str.strip() == "")


def _ids(values: pd.Series, n: int = 5) -> str:
    v = [str(x) for x in values.tolist()]
    return ", ".join(v[:n]) + (f" and {len(v) - n} more" if len(v) > n else "")


def check_checkpoints(cfg: ExperimentConfig, known: dict[str, list[str]] | None = None,
                      passed: dict[str, list[str]] | None = None) -> tuple[list[str], list[str]]:
    """(errors, notices) of both checkpoints, each naming its ``[models]`` key and folder.

    ``known`` maps ``"<key>:<checkpoint_key>"`` (:func:`checkpoint_key`) of a checkpoint that passed before
    to its notices: such a checkpoint is not checked again (a new fine-tune re-checks only the fine-tuned
    folder). Each checkpoint that passes now is added to ``passed`` under its key."""
    from msif_core.checkpoints import checkpoint_problems

    errors, notices = [], []
    for key, path in (("pretrained", cfg.pretrained), ("finetuned", cfg.finetuned)):
        ckey = f"{key}:{checkpoint_key(path)}"
        if known is not None and ckey in known:
            n, e = list(known[ckey]), []
        else:
            e, n = checkpoint_problems(path, need_tokenizer=True)
            n = [f"[models] {key}: {x}" for x in n]
        if not e and passed is not None:
            passed[ckey] = n
        errors += [f"[models] {key}: {x}" for x in e]
        notices += n
    return errors, notices


def check_data(cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the corpus, the fine-tuning data and the queries, read completely."""
    errors: list[str] = []
    warnings: list[str] = []
    ids: list[pd.DataFrame] = []
    for f in cfg.corpus_files():
        try:
            df = read_records(f, "[data] pretraining_corpus", ("doc_id", "text"))
        except CorruptTableError as e:
            errors.append(str(e))
            continue
        for col in ("doc_id", "text"):
            bad = df.index[df[col].isna()]
            if len(bad):
                errors.append(f"[data] pretraining_corpus: {f}: {len(bad)} row(s) have no {col} (rows "
                              f"{', '.join(str(i + 1) for i in bad[:5])}); every document needs a doc_id and a text")
        if not pd.api.types.is_string_dtype(df["doc_id"]) and not df.empty and df["doc_id"].notna().all() \
                and not all(isinstance(x, str) for x in df["doc_id"]):
            warnings.append(f"[data] pretraining_corpus: {f}: doc_id values are not strings "
                            f"({type(df['doc_id'].iloc[0]).__name__}); they are compared as text")
        ids.append(pd.DataFrame({"doc_id": df["doc_id"].astype(str), "file": f.name}))
    corpus = pd.concat(ids, ignore_index=True) if ids else pd.DataFrame({"doc_id": [], "file": []})
    if not errors:
        if corpus.empty:
            errors.append(f"[data] pretraining_corpus: {cfg.pretraining_corpus} holds no documents; give it at "
                          f"least one row of doc_id, text")
        dup = corpus[corpus.doc_id.duplicated(keep=False)]
        if len(dup):
            where = dup.groupby("doc_id").file.apply(lambda s: "/".join(sorted(set(s)))).head(5)
            errors.append(f"[data] pretraining_corpus: doc_id must be unique; {dup.doc_id.nunique()} repeat, e.g. "
                          + ", ".join(f"{d} (in {w})" for d, w in where.items()))
    try:
        q = read_records(cfg.queries, "[data] queries", ("query_id", "prompt", "completion"))
        qid = q["query_id"].astype(str)
        dup = qid[qid.duplicated()].unique()
        if len(dup):
            errors.append(f"[data] queries: {cfg.queries}: query_id must be unique; repeated: {_ids(pd.Series(dup))}")
        if q.empty:
            errors.append(f"[data] queries: {cfg.queries} holds no query")
        if q["query_id"].isna().any() or q["prompt"].isna().any():
            errors.append(f"[data] queries: {cfg.queries}: every query needs a query_id and a prompt")
        blank = qid[_empty(q["completion"])]
        if len(blank) and len(blank) == len(q):
            errors.append(f"[data] queries: {cfg.queries}: every query has an empty completion; nothing can be "
                          f"scored")
        elif len(blank):
            warnings.append(f"[data] queries: {len(blank)} of {len(q)} queries have an empty completion and will not "
                            f"be scored: {_ids(blank)} ({cfg.queries})")
        if "true_doc_ids" in q:
            errors += _check_truth(cfg, qid, q["true_doc_ids"], set(corpus.doc_id), warnings)
    except CorruptTableError as e:
        errors.append(str(e))
    try:
        ft = read_records(cfg.finetuning_data, "[data] finetuning_data", ("prompt", "completion"))
        blank = _empty(ft["completion"])
        if cfg.needs_finetune_factors and (ft.empty or blank.all()):
            users = [m for m in cfg.scores.methods if get_method(m).finetune_factors]
            users += ["the influence index"] if cfg.index.enabled else []
            errors.append(f"[data] finetuning_data: {cfg.finetuning_data} has no pair with a completion; "
                          f"{', '.join(users)} fit the fine-tuned model's EK-FAC on them")
        elif blank.any():
            lines = [str(i + 1) for i in ft.index[blank]]
            warnings.append(f"[data] finetuning_data: {int(blank.sum())} pairs have an empty completion and are not "
                            f"fitted on (rows {', '.join(lines[:5])}{' ...' if len(lines) > 5 else ''})")
    except CorruptTableError as e:
        errors.append(str(e))
    return errors, warnings


def _check_truth(cfg: ExperimentConfig, qid: pd.Series, truth: pd.Series, doc_ids: set[str],
                 warnings: list[str]) -> list[str]:
    """``true_doc_ids``: each a list of doc_id strings (or missing); unknown ids are a warning."""
    import numpy as np

    bad, unknown = [], []
    for q, x in zip(qid, truth):
        if x is None or (isinstance(x, float) and np.isnan(x)):
            continue
        if not isinstance(x, (list, tuple, np.ndarray)) or not all(isinstance(d, str) for d in x):
            bad.append(q)
            continue
        if doc_ids:
            unknown += [f"{q}: {d}" for d in x if d not in doc_ids]
    if unknown:
        warnings.append(f"[data] queries: {len(unknown)} true_doc_ids name no document of the corpus "
                        f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); they can never be found")
    if bad:
        return [f"[data] queries: {cfg.queries}: true_doc_ids must be a list of doc_id strings, e.g. [\"d001\"]; "
                f"it is not for {_ids(pd.Series(bad))}"]
    return []


CACHE_NAME = ".msif_preflight.json"  # under the lakehouse root: the key and notices of the last clean check
CHECKS_VERSION = 1  # raise when a check is added or changed: remembered results of older checks do not count


def _file_stats(files: list) -> list:
    """(path, size, modification and change times, inode) of each file; Nones for one that cannot be read."""
    stats = []
    for f in files:
        try:
            st = f.stat()
            stats.append((str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        except OSError:
            stats.append((str(f), None, None, None, None))
    return stats


def _hash(obj: object) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _folder_files(folder: object) -> list:
    from pathlib import Path

    return sorted(p for p in Path(folder).iterdir() if p.is_file()) if Path(folder).is_dir() else []


def checkpoint_key(folder: object) -> str:
    """A hash of the checks' version and the checkpoint folder's files (path, size, times, inode): what a
    passed check of that one checkpoint stays valid for."""
    return _hash({"checks": CHECKS_VERSION, "checkpoint": str(folder), "files": _file_stats(_folder_files(folder))})


def _inputs_key(cfg: ExperimentConfig) -> str:
    """A hash of the checks' version, the settings and every input file's path, size, modification and change
    times and inode (the checkpoint folders' files, the corpus, the fine-tuning data, the queries): what a
    passed check stays valid for."""
    from pathlib import Path

    files = [*_folder_files(cfg.pretrained), *_folder_files(cfg.finetuned),
             *cfg.corpus_files(), Path(cfg.finetuning_data), Path(cfg.queries)]
    return _hash({"checks": CHECKS_VERSION, "settings": cfg.as_dict(), "files": _file_stats(files)})


def preflight(cfg: ExperimentConfig, cache: bool = True) -> list[str]:
    """Run every check above; raise one ConfigError listing all errors, else return notices and warnings.

    With ``cache``, a check that passed is remembered under the lakehouse root (:data:`CACHE_NAME`) with
    the hash of the settings and of the input files' sizes and modification times: while those are the same,
    the notices are returned without reading the inputs again (each Dagster run process loads the
    definitions, and with them this check: 2 s on a tiny world). When anything changed, a checkpoint whose
    own files did not (:func:`checkpoint_key`; the pre-trained one after a new fine-tune) is not checked
    again: building its model on the meta device and loading its tokenizer take seconds."""
    import json
    from pathlib import Path

    path = Path(cfg.root) / CACHE_NAME
    key = _inputs_key(cfg) if cache else ""
    known: dict[str, list[str]] = {}
    if cache:
        try:
            hit = json.loads(path.read_text())
            if hit.get("key") == key:
                return list(hit["notes"])
            known = {str(k): list(v) for k, v in dict(hit.get("checkpoints", {})).items()}
        except (OSError, ValueError, KeyError, TypeError):
            known = {}
    passed: dict[str, list[str]] = {}
    notes = _preflight(cfg, known if cache else None, passed)
    if cache and Path(cfg.root).is_dir():
        from .io import write_text_atomic

        try:
            write_text_atomic(json.dumps({"key": key, "notes": notes, "checkpoints": passed}), path)
        except OSError:  # a read-only lakehouse: check every time
            pass
    return notes


def _preflight(cfg: ExperimentConfig, known: dict[str, list[str]] | None = None,
               passed: dict[str, list[str]] | None = None) -> list[str]:
    from .config import input_errors

    errors = input_errors(cfg)  # and keep going: report what the other checks find too
    e1, notices = check_checkpoints(cfg, known, passed)
    e1 = [x for x in e1 if not any(x.startswith(y.split(":", 1)[0] + ":") for y in errors)]
    missing_data = any("[data]" in x for x in errors)
    e2, warnings = ([], []) if missing_data else check_data(cfg)
    errors += [x for x in e1 + e2 if x not in errors]
    if errors:
        name = str(cfg.source) if cfg.source else "demo config"
        raise ConfigError(f"{name}: " + "; ".join(errors))
    return notices + warnings
