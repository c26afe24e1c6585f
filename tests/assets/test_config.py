"""The experiment file: defaults, paths relative to the file, MSIF_CONFIG, the demo fallback, and a clear
ConfigError (naming section, key and file) for every unknown key, wrong type, bad value or missing file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from msif_assets.config import ConfigError, load_config, resolve_corpus_files
from msif_core.methods import DEFAULT_METHODS

PINNED_FACTOR_DIGEST = "19cfaf6eec9b14c4"  # default [factors], computed with the code of commit 6af6cb0

MINIMAL = """
[lakehouse]
root = "out"
[models]
pretrained = "ckpt/pt"
finetuned = "ckpt/ft"
[data]
pretraining_corpus = "data/corpus.parquet"
finetuning_data = "data/ft.jsonl"
queries = "data/q.jsonl"
"""


@pytest.fixture
def world(tmp_path: Path) -> Path:
    for name in ("pt", "ft"):
        d = tmp_path / "ckpt" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    pd.DataFrame({"doc_id": ["a", "b"], "text": ["x y", "z w"]}).to_parquet(tmp_path / "data" / "corpus.parquet")
    (tmp_path / "data" / "ft.jsonl").write_text(json.dumps({"prompt": "p", "completion": " c"}) + "\n")
    (tmp_path / "data" / "q.jsonl").write_text(
        json.dumps({"query_id": "q1", "prompt": "p", "completion": " c", "true_doc_ids": ["a"]}) + "\n")
    return tmp_path


def write(world: Path, extra: str = "", base: str = MINIMAL) -> Path:
    p = world / "exp.toml"
    p.write_text(base + extra)
    return p


def test_defaults_and_relative_paths(world: Path) -> None:
    cfg = load_config(write(world))
    assert cfg.root == (world / "out").resolve()
    assert cfg.pretrained == (world / "ckpt" / "pt").resolve()
    assert cfg.corpus_files() == [world / "data" / "corpus.parquet"]
    assert cfg.shard_size == 10_000
    f, s = cfg.factors, cfg.scores
    assert (f.fisher, f.attention_blocks, f.modules, f.max_examples, f.max_length, f.batch_size) == \
        ("true", "per_head", "all", 100_000, 512, 8)
    assert s.methods == DEFAULT_METHODS
    assert (s.damping_pretrain, s.damping_finetune, s.candidates, s.query_rank) == (1e-4, 1e-4, 100, 0)
    assert cfg.has_ground_truth()


def test_all_keys_set(world: Path) -> None:
    base = MINIMAL.replace('queries = "data/q.jsonl"', 'queries = "data/q.jsonl"\nshard_size = 7')
    cfg = load_config(write(world, """
[factors]
fisher = "empirical"
attention_blocks = "fused"
modules = "mlp"
max_examples = 50
max_length = 64
batch_size = 2
[scores]
methods = ["ms_if", "bm25"]
damping_pretrain = "relative:0.1"
damping_finetune = 0
candidates = "all"
query_rank = 4
""", base))
    assert cfg.shard_size == 7
    assert cfg.factors.fisher == "empirical" and cfg.factors.modules == "mlp" and cfg.factors.batch_size == 2
    assert cfg.scores.methods == ("ms_if", "bm25")
    assert cfg.scores.gradient_methods == ("ms_if",)
    assert cfg.scores.damping_pretrain == "relative:0.1" and cfg.scores.damping_finetune == 0.0
    assert cfg.scores.candidates == "all" and cfg.scores.query_rank == 4


@pytest.mark.parametrize("extra, words", [
    ("[factors]\nfishr = \"true\"\n", ["[factors]", "unknown key", "fishr"]),
    ("[scoring]\nmethods = []\n", ["unknown section", "[scoring]"]),
    ("[factors]\nmax_length = \"512\"\n", ["[factors] max_length", "an integer", "str"]),
    ("[factors]\nbatch_size = 2.5\n", ["[factors] batch_size", "an integer"]),
    ("[factors]\nbatch_size = true\n", ["[factors] batch_size", "an integer"]),
    ("[factors]\nfisher = \"exact\"\n", ["[factors] fisher", "'true'", "'empirical'"]),
    ("[factors]\nmax_length = 1\n", ["max_length", ">= 2"]),
    ("[scores]\nmethods = [\"ms_if\", \"tracin\"]\n", ["methods", "tracin"]),
    ("[scores]\nmethods = \"ms_if\"\n", ["methods", "a list of strings"]),
    ("[scores]\ndamping_pretrain = \"relative:x\"\n", ["damping_pretrain", "relative"]),
    ("[scores]\ndamping_finetune = \"1e-4\"\n", ["damping_finetune", "relative:<c>"]),
    ("[scores]\ndamping_finetune = -1.0\n", ["damping_finetune", ">= 0"]),
    ("[scores]\ncandidates = \"some\"\n", ["candidates", "\"all\""]),
    ("[scores]\ncandidates = 0\n", ["candidates", ">= 1"]),
    ("[index]\ngdp = true\n", ["[index] gdp = true", "dimensions > 0"]),
    ("[scores]\nmethods = [\"ms_if\", \"gdp_index\"]\n", ["gdp_index", "[index] gdp = true"]),
    ("[factors.module_tags]\n\"a.b\" = \"attention\"\n", ["[factors] module_tags", "\"mlp\" | \"mha\""]),
    ("[factors]\nmodule_tags = [\"a.b\"]\n", ["[factors] module_tags", "a table"]),
    ("[factors.module_tags]\nmodel.layers.0.fc1 = \"mlp\"\n", ["[factors] module_tags", "quote each module name"]),
])
def test_bad_values_are_clear_errors(world: Path, extra: str, words: list[str]) -> None:
    path = write(world, extra)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path.resolve()) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_module_tags(world: Path) -> None:
    """Tagged modules reach the core settings in the file's order; without tags the factor assets' code
    versions are those of a file that never had the key."""
    from msif_assets.assets import attribution_settings, code_versions

    plain = load_config(write(world))
    tagged = load_config(write(world, """
[factors.module_tags]
"model.layers.0.mlp.fc1" = "mlp"
"model.layers.0.self_attn.qkv" = "mha"
"""))
    assert tagged.factors.module_tags == (("model.layers.0.mlp.fc1", "mlp"), ("model.layers.0.self_attn.qkv", "mha"))
    assert attribution_settings(tagged).module_tags == {"model.layers.0.mlp.fc1": "mlp",
                                                        "model.layers.0.self_attn.qkv": "mha"}
    assert attribution_settings(plain).module_tags is None and plain.factors.module_tags == ()
    assert "factors.module_tags" not in plain.as_dict()
    a, b = code_versions(plain, "e"), code_versions(tagged, "e")
    assert a["pretrain_factors"] != b["pretrain_factors"] and a["query_ihvps"] != b["query_ihvps"]
    assert a["corpus_shards"] == b["corpus_shards"]
    # the digests of the default factor settings, as before module_tags existed (commit 6af6cb0)
    old_factor_settings = ("factors.fisher", "factors.attention_blocks", "factors.modules", "factors.max_examples",
                           "factors.max_length", "factors.batch_size")
    assert plain.digest(*old_factor_settings, "factors.module_tags") == plain.digest(*old_factor_settings) \
        == PINNED_FACTOR_DIGEST
    with pytest.raises(KeyError, match="shard_sise"):
        plain.digest("shard_sise")


def test_query_ihvps_version_counts_gradient_methods_only(world: Path) -> None:
    """Adding a method without query iHVPs (bm25, retriever, a derived rescaling of ms_if) keeps the query iHVPs'
    code version; adding a gradient method changes it, and the scores' version changes in both cases."""
    from msif_assets.assets import code_versions

    def versions(methods: list[str]) -> dict[str, str]:
        return code_versions(load_config(write(world, f"[scores]\nmethods = {json.dumps(methods)}\n")), "e")

    base = versions(["ms_if", "bm25"])
    more = versions(["bm25", "ms_if", "retriever", "ms_if_cosine"])
    grad = versions(["ms_if", "bm25", "ss_if"])
    assert more["query_ihvps"] == base["query_ihvps"] != grad["query_ihvps"]
    assert len({base["influence_scores"], more["influence_scores"], grad["influence_scores"]}) == 3
    fused = versions(["bm25", "ms_if", "retriever", "ms_if_cosine", "ms_if_rrf"])  # a ranking the views compute
    assert fused["influence_scores"] == more["influence_scores"] and fused["query_ihvps"] == more["query_ihvps"]
    assert fused["score_tables"] != more["score_tables"]
    # the fusion's constant: only the views change
    other_k = code_versions(load_config(write(world, '[scores]\nmethods = ["bm25", "ms_if", "retriever", '
                                                     '"ms_if_cosine", "ms_if_rrf"]\nrrf_k = 60\n')), "e")
    assert {a: v for a, v in other_k.items() if v != fused[a]}.keys() == {"score_tables"}


def test_a_mixed_method_needs_the_methods_it_fuses(world: Path) -> None:
    with pytest.raises(ConfigError, match=r"ms_if_rrf fuses the rankings of ms_if and retriever; list \['retriever'\]"):
        load_config(write(world, '[scores]\nmethods = ["ms_if", "ms_if_rrf"]\n'))


def test_missing_required_key(world: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[models\] finetuned is required"):
        load_config(write(world, base=MINIMAL.replace('finetuned = "ckpt/ft"\n', "")))


@pytest.mark.parametrize("what, rel", [("checkpoint", "ckpt/ft"), ("queries", "data/q.jsonl"),
                                       ("corpus", "data/corpus.parquet"), ("finetuning", "data/ft.jsonl")])
def test_missing_files(world: Path, what: str, rel: str) -> None:
    target = world / rel
    if target.is_dir():
        (target / "config.json").unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(ConfigError) as e:
        load_config(write(world))
    assert str(target.resolve()) in str(e.value) or str(target) in str(e.value)


def test_missing_columns_and_unreadable_file(world: Path) -> None:
    (world / "data" / "q.jsonl").write_text(json.dumps({"id": "q1", "prompt": "p"}) + "\n")
    with pytest.raises(ConfigError, match=r"\[data\] queries.*lacks the column\(s\) \['query_id', 'completion'\]"):
        load_config(write(world))
    (world / "data" / "corpus.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(write(world))


def test_env_var_and_missing_file(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(world)
    monkeypatch.setenv("MSIF_CONFIG", str(path))
    assert load_config().source == path.resolve()
    monkeypatch.setenv("MSIF_CONFIG", str(world / "nope.toml"))
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load_config()


def test_invalid_toml(world: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(world, "[factors\n"))


def test_no_file_means_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library needs a file; the app falls back to its demo."""
    from dagster_project.demo import load_experiment

    monkeypatch.delenv("MSIF_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no experiment file"):
        load_config(check_files=False)
    cfg = load_experiment(check_files=False)
    assert cfg.is_demo and cfg.source is None
    assert cfg.root == (tmp_path / "lakehouse" / "demo").resolve()
    assert cfg.pretrained == cfg.root / "models" / "pretrained"
    assert cfg.queries == cfg.root / "data" / "queries.jsonl"


def test_corpus_folder_glob_and_jsonl(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(3):
        pd.DataFrame({"doc_id": [f"d{i}"], "text": ["t"]}).to_parquet(d / f"part-{i}.parquet")
    assert [f.name for f in resolve_corpus_files(str(d))] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert len(resolve_corpus_files(str(d / "part-[01].parquet"))) == 2
    (d / "extra.jsonl").write_text('{"doc_id": "x", "text": "t"}\n')
    with pytest.raises(ConfigError, match="mixes Parquet and JSONL"):
        resolve_corpus_files(str(d))
