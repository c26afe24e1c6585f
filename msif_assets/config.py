"""The experiment file: a TOML file that says which checkpoints and data to attribute, and how.

It is chosen by ``msif run PATH`` or the environment variable ``MSIF_CONFIG`` (without either, the app
uses its built-in demo: :mod:`dagster_project.demo`). Paths in the file are relative to the file. Every
problem (unknown section or key, wrong type, bad value, missing file) is reported as one
:class:`ConfigError` that names the file, the section and the key, before any work starts.

The keys of ``[factors]`` and ``[scores]``, their types, defaults, allowed values and lower bounds are
the fields of :class:`msif_core.settings.FactorSettings` and :class:`msif_core.settings.ScoreSettings`
(plus ``candidates``, a setting of the pipeline only, in :class:`PipelineScoreSettings`); this module
only adds the file's own sections and checks.

Example (every key but the paths shows its default)::

    [lakehouse]
    root = "lakehouse/my_run"              # every output lives under it

    [models]
    pretrained = "ckpt/pretrained"         # local Hugging Face checkpoint directories
    finetuned = "ckpt/finetuned"

    [data]
    pretraining_corpus = "data/corpus/*.parquet"   # Parquet file, folder or glob, or JSONL: doc_id, text
    finetuning_data = "data/finetune.jsonl"        # JSONL or Parquet: prompt, completion
    queries = "data/queries.jsonl"                 # JSONL or Parquet: query_id, prompt, completion
    shard_size = 10000                             #   (+ optional true_doc_ids)

    [factors]
    fisher = "true"                 # or "empirical"
    attention_blocks = "per_head"   # or "fused"
    modules = "all"                 # or "mlp"
    max_examples = 100000
    max_length = 512
    batch_size = 8

    # [factors.module_tags]          # only for architectures msif does not discover (default: none):
    # "model.layers.0.mlp.fc1" = "mlp" #   each named module is one block, "mlp" or "mha"; quote the names

    [scores]
    methods = ["ms_if", "ss_if", "gdp", "repsim", "bm25", "retriever"]
    damping_pretrain = 1e-4         # a number, or "relative:0.1"
    damping_finetune = 1e-4
    candidates = 100                # nearest documents per query and shard, "all", or "index" (needs [index])
    query_rank = 0                  # 0 exact; r > 0 rank-r query iHVPs (of each module)
    rrf_k = 1                       # the constant of the mixed ms_if_rrf: sum of 1 / (k + rank)
    # memory_gib = 8                # memory budget of the process, models included; default: half the memory available

    [index]                         # the pre-training influence index (msif_core.index); off by default
    dimensions = 0                  # numbers per index vector; 0: no index
    whiten = true                   # (Λ+λ)^(-1/2) on both sides; false: all of P_pt on the query side
    seed = 0                        # of the random projection
    cosine = true                   # rank ms_if_index by <psi, phi> / |phi| (false: the plain product)
    dtype = "float16"               # unit rows + their norms (half the bytes, same ranking); or "float32"
    gdp = false                     # also gdp_index: gradient dot product from the same index
    keep = 100                      # documents per query and shard kept as method ms_if_index (and gdp_index)
    rerank = 100                    # with candidates = "index": documents per query and shard scored exactly
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from msif_core.methods import ALL_METHODS, DERIVED, MIXED, RRF_K
from msif_core.settings import FactorSettings, IndexSettings, ScoreSettings, setting

ENV_VAR = "MSIF_CONFIG"
_OMITTED_WHEN_EMPTY = ("factors.module_tags",)  # settings added later: absent from as_dict/digest when empty


class ConfigError(ValueError):
    """A problem with the experiment file, reported before any work starts."""


@dataclass(frozen=True)
class PipelineScoreSettings(ScoreSettings):
    """``[scores]`` of an experiment file: the core's score settings and the candidate prefilter."""

    candidates: int | str = setting(100, 'nearest documents per query and shard (LanceDB), "all", or "index" (each '
                                         "query's top [index] rerank by the influence index)", minimum=1)
    rrf_k: int = setting(RRF_K, "the constant k of the mixed ms_if_rrf, Σ 1 / (k + rank): small k favours each "
                                "ranking's first documents", minimum=1)


@dataclass(frozen=True)
class ExperimentConfig:
    """A parsed, validated experiment file. Paths are absolute."""

    root: Path
    pretrained: Path
    finetuned: Path
    pretraining_corpus: str
    finetuning_data: Path
    queries: Path
    shard_size: int = 10_000
    factors: FactorSettings = field(default_factory=FactorSettings)
    scores: PipelineScoreSettings = field(default_factory=PipelineScoreSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    source: Path | None = None  # the TOML file, None for the demo
    is_demo: bool = False
    # (TOML file, folder its relative paths resolve against): how another process rebuilds this experiment
    # (:func:`reload_config`; the step processes of ``msif run --workers N``); None when built in code
    origin: tuple[str, str] | None = None

    def corpus_files(self) -> list[Path]:
        """The corpus files, sorted by path (Parquet or JSONL); the corpus order is this order."""
        return resolve_corpus_files(self.pretraining_corpus)

    def digest(self, *parts: str) -> str:
        """A short stable hash of the named settings (``"factors.fisher"``, ``"shard_size"``, ...); a setting
        left at its empty default (``factors.module_tags``) does not count, so adding such a key to the
        settings an asset depends on leaves existing code versions as they were. Unknown names raise."""
        flat = self.as_dict()
        unknown = [p for p in parts if p not in flat and p not in _OMITTED_WHEN_EMPTY]
        if unknown:
            raise KeyError(f"no setting named {unknown}")
        chosen = {p: flat[p] for p in parts if p in flat}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        """Flat ``section.key`` → value view of the settings (paths as strings)."""
        out: dict[str, Any] = {
            "lakehouse.root": str(self.root), "models.pretrained": str(self.pretrained),
            "models.finetuned": str(self.finetuned), "data.pretraining_corpus": self.pretraining_corpus,
            "data.finetuning_data": str(self.finetuning_data), "data.queries": str(self.queries),
            "shard_size": self.shard_size,
        }
        out |= {f"factors.{k}": v for k, v in asdict(self.factors).items()
                if f"factors.{k}" not in _OMITTED_WHEN_EMPTY or v}
        out |= {f"scores.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.scores).items()}
        out |= {f"index.{k}": v for k, v in asdict(self.index).items()}
        return out

    @property
    def needs_pretrain_factors(self) -> bool:
        """Whether a configured method or the influence index uses the pre-trained model's EK-FAC."""
        return self.scores.needs_pretrain_factors or self.index.enabled

    @property
    def needs_finetune_factors(self) -> bool:
        """Whether a configured method or the influence index (its query side) uses the fine-tune EK-FAC."""
        return self.scores.needs_finetune_factors or self.index.enabled

    def has_ground_truth(self) -> bool:
        """Whether the queries carry ``true_doc_ids`` (then ``attribution_quality`` is computed)."""
        return "true_doc_ids" in table_columns(self.queries)


# --------------------------------------------------------------------------------------------- schema

_STR, _INT, _NUM_OR_STR, _INT_OR_STR, _STR_LIST = "a string", "an integer", "a number or a string", \
    "an integer or a string", "a list of strings"
_TAGS = 'a table of "module name" = "mlp" | "mha"'


_NUM, _BOOL = "a number", "true or false"
_KINDS = {"str": _STR, "int": _INT, "bool": _BOOL, "float | None": _NUM, "float | str": _NUM_OR_STR,
          "int | str": _INT_OR_STR, "tuple[str, ...]": _STR_LIST, "tuple[tuple[str, str], ...]": _TAGS}


def _section(cls: type) -> dict[str, tuple[str, Any]]:
    """(kind, default) of every field of a settings dataclass, in the file's terms (tuples as lists/tables)."""
    out = {}
    for f in fields(cls):
        default = f.default
        if f.name == "module_tags":
            default = dict(default)
        elif isinstance(default, tuple):
            default = list(default)
        out[f.name] = (_KINDS[str(f.type)], default)
    return out


def _field_rules(sec: str, cls: type) -> tuple[dict, dict]:
    """(choices, minimum) of the fields of ``cls``, keyed by (section, key)."""
    fs = fields(cls)
    return ({(sec, f.name): f.metadata["choices"] for f in fs if "choices" in f.metadata},
            {(sec, f.name): f.metadata["minimum"] for f in fs if "minimum" in f.metadata})


_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "lakehouse": {"root": (_STR, None)},
    "models": {"pretrained": (_STR, None), "finetuned": (_STR, None)},
    "data": {"pretraining_corpus": (_STR, None), "finetuning_data": (_STR, None), "queries": (_STR, None),
             "shard_size": (_INT, 10_000)},
    "factors": _section(FactorSettings),
    "scores": _section(PipelineScoreSettings),
    "index": _section(IndexSettings),
}
_REQUIRED = {("lakehouse", "root"), ("models", "pretrained"), ("models", "finetuned"),
             ("data", "pretraining_corpus"), ("data", "finetuning_data"), ("data", "queries")}
_CHOICES, _MINIMUM = {}, {("data", "shard_size"): 1}
for _sec, _cls in (("factors", FactorSettings), ("scores", PipelineScoreSettings), ("index", IndexSettings)):
    _c, _m = _field_rules(_sec, _cls)
    _CHOICES |= _c
    _MINIMUM |= _m


def _type_ok(kind: str, v: Any) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    return {
        _STR: isinstance(v, str),
        _INT: is_int,
        _BOOL: isinstance(v, bool),
        _NUM: is_int or isinstance(v, float),
        _NUM_OR_STR: is_int or isinstance(v, (float, str)) and not isinstance(v, bool),
        _INT_OR_STR: is_int or isinstance(v, str),
        _STR_LIST: isinstance(v, list) and all(isinstance(x, str) for x in v),
        _TAGS: isinstance(v, dict) and all(isinstance(x, str) and x in ("mlp", "mha") for x in v.values()),
    }[kind]


def _damping(where: str, v: float | int | str) -> float | str:
    if isinstance(v, str):
        if not v.startswith("relative:"):
            raise ConfigError(f"{where}: must be a number or 'relative:<c>' (e.g. 'relative:0.1'), got {v!r}")
        try:
            c = float(v.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"{where}: 'relative:<c>' needs a number after the colon, got {v!r}") from None
        if not c > 0:
            raise ConfigError(f"{where}: the relative factor must be > 0, got {v!r}")
        return f"relative:{c:g}"
    if not float(v) >= 0:
        raise ConfigError(f"{where}: damping must be >= 0, got {v!r}")
    return float(v)


def resolve_corpus_files(spec: str) -> list[Path]:
    """Files of a corpus given as a Parquet/JSONL file, a folder (its ``*.parquet``/``*.jsonl``) or a glob."""
    p = Path(spec)
    if any(ch in spec for ch in "*?["):
        files = [Path(f) for f in glob.glob(spec, recursive=True)]
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.suffix in (".parquet", ".jsonl", ".json")]
    elif p.exists():
        files = [p]
    else:
        files = []
    files = sorted(f for f in files if f.is_file() and not f.name.startswith("."))
    kinds = {f.suffix in (".jsonl", ".json") for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"[data] pretraining_corpus: {spec} mixes Parquet and JSONL files; use one format")
    return files


def table_columns(path: Path) -> list[str]:
    """Column names of a Parquet or JSONL table (JSONL: the keys of its first record)."""
    if path.suffix in (".jsonl", ".json"):
        with path.open("rb") as fh:  # decode line by line: a bad byte further on is the data check's to name
            for raw in fh:
                line = raw.decode("utf-8")
                if line.strip():
                    return list(json.loads(line).keys())
        return []
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def _check_table(where: str, path: Path, needed: tuple[str, ...]) -> None:
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise ConfigError(f"{where}: {path} must be a .jsonl or .parquet file")
    try:
        cols = table_columns(path)
    except Exception as e:  # noqa: BLE001 - any read error is a config problem here
        raise ConfigError(f"{where}: cannot read {path} ({type(e).__name__}: {e}); fix or regenerate the file") from e
    missing = [c for c in needed if c not in cols]
    if missing:
        raise ConfigError(f"{where}: {path} lacks the column(s) {missing} (it has {cols}); needed: {list(needed)}")


def parse_config(raw: dict[str, Any], base_dir: Path, source: Path | None = None,
                 check_files: bool = True, is_demo: bool = False) -> ExperimentConfig:
    """Validate a parsed TOML document and resolve its paths against ``base_dir``."""
    name = str(source) if source else "experiment config"
    errors: list[str] = []
    values: dict[tuple[str, str], Any] = {}
    for section, body in raw.items():
        if section not in _SCHEMA:
            errors.append(f"unknown section [{section}] (known: {', '.join(f'[{s}]' for s in _SCHEMA)})")
            continue
        if not isinstance(body, dict):
            errors.append(f"[{section}] must be a table of keys")
            continue
        for key, v in body.items():
            if key not in _SCHEMA[section]:
                errors.append(f"[{section}] unknown key {key!r} (known: {', '.join(_SCHEMA[section])})")
                continue
            kind = _SCHEMA[section][key][0]
            if not _type_ok(kind, v):
                hint = ""
                if kind == _TAGS and isinstance(v, dict) and any(isinstance(x, dict) for x in v.values()):
                    hint = ' (quote each module name: "model.layers.0.mlp.fc1" = "mlp"; unquoted dots nest tables)'
                errors.append(f"[{section}] {key} must be {kind}, got {type(v).__name__} {v!r}{hint}")
                continue
            values[(section, key)] = v
    for sec, key in sorted(_REQUIRED):
        if (sec, key) not in values and not any(e.startswith(f"[{sec}] {key} ") for e in errors):
            errors.append(f"[{sec}] {key} is required")
    # values of the wrong type were left out of ``values``: the checks below see their defaults, so every
    # problem of the file is reported together

    def get(sec: str, key: str) -> Any:
        return values.get((sec, key), _SCHEMA[sec][key][1])

    for (sec, key), choices in _CHOICES.items():
        if get(sec, key) not in choices:
            errors.append(f"[{sec}] {key} must be one of {list(choices)}, got {get(sec, key)!r}")
    for (sec, key), lo in _MINIMUM.items():
        if isinstance(get(sec, key), int) and get(sec, key) < lo:
            errors.append(f"[{sec}] {key} must be >= {lo}, got {get(sec, key)}")
    methods = get("scores", "methods")
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        hint = (" (ms_if_index is added by [index] dimensions > 0, gdp_index by [index] gdp = true; not listed "
                "here)" if {"ms_if_index", "gdp_index"} & set(bad) else "")
        errors.append(f"[scores] methods: unknown {bad} (known: {list(ALL_METHODS)}){hint}")
    if not methods:
        errors.append("[scores] methods must name at least one method")
    for m, base in DERIVED.items():
        if m in methods and base not in methods:
            errors.append(f"[scores] methods: {m} rescales {base}'s scores; list {base} too")
    for m, parts in MIXED.items():
        absent = [p for p in parts if p not in methods]
        if m in methods and absent:
            errors.append(f"[scores] methods: {m} fuses the rankings of {' and '.join(parts)}; list {absent} too")
    if len(set(methods)) != len(methods):
        errors.append(f"[scores] methods lists a method twice: {methods}")
    mem = get("scores", "memory_gib")
    if mem is not None and not mem > 0:
        errors.append(f"[scores] memory_gib must be > 0 GiB (leave it out for automatic), got {mem}")
    cand = get("scores", "candidates")
    if isinstance(cand, str) and cand not in ("all", "index"):
        errors.append(f"[scores] candidates must be a positive integer, \"all\" or \"index\", got {cand!r}")
    if cand == "index" and not get("index", "dimensions"):
        errors.append('[scores] candidates = "index" needs the influence index: set [index] dimensions > 0')
    if get("index", "gdp") is True and not get("index", "dimensions"):
        errors.append("[index] gdp = true scores GDP from the influence index: set [index] dimensions > 0 too (or "
                      "list gdp in [scores] methods for the exact gradient dot product)")
    damping = {}
    for key in ("damping_pretrain", "damping_finetune"):
        try:
            damping[key] = _damping(f"[scores] {key}", get("scores", key))
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError(f"{name}: " + "; ".join(errors))

    def path(sec: str, key: str) -> Path:
        p = Path(os.path.expanduser(get(sec, key)))
        return (p if p.is_absolute() else base_dir / p).resolve()

    corpus_spec = get("data", "pretraining_corpus")
    corpus_path = Path(os.path.expanduser(corpus_spec))
    corpus = str(corpus_path if corpus_path.is_absolute() else base_dir / corpus_path)
    cfg = ExperimentConfig(
        root=path("lakehouse", "root"), pretrained=path("models", "pretrained"), finetuned=path("models", "finetuned"),
        pretraining_corpus=corpus, finetuning_data=path("data", "finetuning_data"), queries=path("data", "queries"),
        shard_size=get("data", "shard_size"),
        factors=FactorSettings(**{k: get("factors", k) for k in _SCHEMA["factors"] if k != "module_tags"},
                               module_tags=tuple(get("factors", "module_tags").items())),
        scores=PipelineScoreSettings(methods=tuple(methods), damping_pretrain=damping["damping_pretrain"],
                                     damping_finetune=damping["damping_finetune"], candidates=cand,
                                     rrf_k=get("scores", "rrf_k"),
                                     query_rank=get("scores", "query_rank"),
                                     memory_gib=None if mem is None else float(mem)),
        index=IndexSettings(**{k: get("index", k) for k in _SCHEMA["index"]}),
        source=source, is_demo=is_demo)
    if check_files:
        check_inputs(cfg)
    return cfg


def check_inputs(cfg: ExperimentConfig) -> None:
    """Raise a :class:`ConfigError` naming every missing or unreadable checkpoint and data file."""
    errors = input_errors(cfg)
    if errors:
        name = str(cfg.source) if cfg.source else "demo config"
        raise ConfigError(f"{name}: " + "; ".join(errors))


def input_errors(cfg: ExperimentConfig) -> list[str]:
    """Every missing or unreadable checkpoint and data file, one phrase each."""
    errors = []
    for key, p in (("pretrained", cfg.pretrained), ("finetuned", cfg.finetuned)):
        if not p.is_dir():
            errors.append(f"[models] {key}: {p} is not a directory (a local Hugging Face checkpoint written by "
                          f"save_pretrained)")
        elif not (p / "config.json").exists():
            errors.append(f"[models] {key}: {p} has no config.json; it is not a Hugging Face checkpoint")
    try:
        files = cfg.corpus_files()
    except ConfigError as e:
        errors.append(str(e))
        files = []
    if not files and not any("pretraining_corpus" in e for e in errors):
        errors.append(f"[data] pretraining_corpus: no Parquet or JSONL file matches {cfg.pretraining_corpus}")
    elif files:
        try:
            _check_table("[data] pretraining_corpus", files[0], ("doc_id", "text"))
        except ConfigError as e:
            errors.append(str(e))
    for key, p, needed in (("finetuning_data", cfg.finetuning_data, ("prompt", "completion")),
                           ("queries", cfg.queries, ("query_id", "prompt", "completion"))):
        if not p.is_file():
            errors.append(f"[data] {key}: file {p} does not exist")
            continue
        try:
            _check_table(f"[data] {key}", p, needed)
        except ConfigError as e:
            errors.append(str(e))
    return errors


def load_config(path: str | Path | None = None, check_files: bool = True) -> ExperimentConfig:
    """The experiment at ``path``, else at ``$MSIF_CONFIG`` (a ConfigError when neither is given)."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is None:
        raise ConfigError(f"no experiment file: pass its path or set {ENV_VAR}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"experiment file {p} does not exist (given by {'argument' if path else ENV_VAR})")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    cfg = parse_config(raw, p.resolve().parent, source=p.resolve(), check_files=check_files)
    return replace(cfg, origin=(str(p.resolve()), str(p.resolve().parent)))


def load_toml(path: Path, base_dir: Path, check_files: bool = False, is_demo: bool = False) -> ExperimentConfig:
    """An experiment file whose paths are relative to ``base_dir`` instead of the file (the app's demo)."""
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    cfg = parse_config(raw, Path(base_dir).resolve(), source=None, check_files=check_files, is_demo=is_demo)
    return replace(cfg, origin=(str(Path(path).resolve()), str(Path(base_dir).resolve())))


def reload_config(origin: tuple[str, str], is_demo: bool = False) -> ExperimentConfig:
    """The experiment of ``cfg.origin`` read again (in another process): the same settings and paths."""
    toml, base = origin
    if is_demo:
        return load_toml(Path(toml), Path(base), is_demo=True)
    return load_config(toml, check_files=False)
