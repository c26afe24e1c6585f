"""Bad input gets a specific error, and nothing half-written is left behind."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from helpers.core import (
    PAD,
    assert_scaled_close,
    one_thread,  # noqa: F401  (autouse fixture)
    random_docs,
    random_pairs,
    tiny_model,
)

from msif_core import ekfac as ekfac_module
from msif_core.api import AttributionSettings, load_stages
from msif_core.checkpoints import load_model
from msif_core.data import Encoded, encode_classification, encode_documents, encode_pairs
from msif_core.ekfac import (
    CovarianceSums,
    Factors,
    FitSettings,
    LambdaSums,
    covariance_sums,
    eigenbasis,
    finalize,
    fit_ekfac,
    lambda_sums,
    merge_all,
)
from msif_core.models import check_compatible, discover_modules, fingerprint
from msif_core.query import QueryIHVPs, measurement_gradients, query_ihvps
from msif_core.scoring import score_documents

EMPTY = Encoded([], [])


@pytest.fixture(scope="module")
def small():
    model = tiny_model("gpt_neox", seed=4)
    specs = discover_modules(model)
    f = fit_ekfac(model, specs, random_docs(4, 3, 6, seed=1), FitSettings(fisher="empirical", batch_size=2), PAD)
    return model, specs, f


class CharTokenizer:
    """One token per character (a stand-in with the call signature the encoders use)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 30) for c in text]}


# ------------------------------------------------------------------------------------- paths

def test_missing_or_non_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "notes")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
        load_model(tmp_path / "file.bin")
    model = tiny_model("gpt_neox")
    model.config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(ValueError, match="no weights"):
        load_model(tmp_path / "config_only")
    with pytest.raises(FileNotFoundError):
        load_stages(tmp_path / "nowhere", tmp_path / "notes", AttributionSettings())


def test_checkpoint_without_tokenizer_loads_without_inventing_one(tmp_path, caplog):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    with caplog.at_level(logging.WARNING, logger="msif_core.checkpoints"):
        loaded = load_model(tmp_path / "m", dtype=torch.float64)
    assert loaded.tokenizer is None and loaded.task == "causal_lm"
    assert "no tokenizer" in caplog.text


def test_safetensors_are_preferred_and_remote_code_never_runs(tmp_path):
    model = tiny_model("gpt_neox").float()
    model.save_pretrained(tmp_path / "m")
    torch.save({k: v + 1.0 for k, v in model.state_dict().items()}, tmp_path / "m" / "pytorch_model.bin")
    key = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    loaded = load_model(tmp_path / "m", dtype=torch.float32)
    assert torch.equal(loaded.model.state_dict()[key], model.state_dict()[key])  # not the .bin's weights
    # a checkpoint that asks for its own code: the code is never imported, the known architecture loads
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('remote code ran')\n")
    assert type(load_model(tmp_path / "m", dtype=torch.float32).model).__name__ == "GPTNeoXForCausalLM"
    assert not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------- incompatible models

@pytest.mark.parametrize("change, first", [
    ({"intermediate_size": 48}, "gpt_neox.layers.0.mlp.dense_h_to_4h"),
    ({"num_attention_heads": 4}, "gpt_neox.layers.0.attention.query_key_value"),
    ({"attention_bias": False}, "gpt_neox.layers.0.attention.query_key_value"),
    ({"num_hidden_layers": 3}, "gpt_neox.layers.2.attention.query_key_value"),
])
def test_backbones_whose_blocks_differ_name_the_first_mismatch(tmp_path, change, first):
    tiny_model("gpt_neox").save_pretrained(tmp_path / "pt")
    tiny_model("gpt_neox", **change).save_pretrained(tmp_path / "ft")
    with pytest.raises(ValueError, match="(differs between the pre-trained and fine-tuned|fine-tuned model only)") as e:
        load_stages(tmp_path / "pt", tmp_path / "ft", AttributionSettings())
    assert f"module {first} " in str(e.value)
    with pytest.raises(ValueError, match=f"module {first} "):  # either way round
        load_stages(tmp_path / "ft", tmp_path / "pt", AttributionSettings())


def test_module_tags_choose_the_blocks_of_both_stages(tmp_path):
    tiny_model("gpt_neox").save_pretrained(tmp_path / "pt")
    tiny_model("gpt_neox", seed=1).save_pretrained(tmp_path / "ft")
    tags = {"gpt_neox.layers.1.mlp.dense_4h_to_h": "mlp", "gpt_neox.layers.0.attention.query_key_value": "mha"}
    pt, ft = load_stages(tmp_path / "pt", tmp_path / "ft", AttributionSettings(module_tags=tags))
    for stage in (pt, ft):
        assert [(s.name, s.kind, s.n_blocks) for s in stage.specs] == [(n, k, 1) for n, k in tags.items()]
    with pytest.raises(ValueError, match="not in the model; check the names in module_tags"):
        load_stages(tmp_path / "pt", tmp_path / "ft", AttributionSettings(module_tags={"lm_head.x": "mlp"}))


def test_models_sharing_no_module_are_refused():
    a = discover_modules(tiny_model("gpt_neox"))
    b = discover_modules(tiny_model("llama"))
    with pytest.raises(ValueError, match="share no analysed module"):
        check_compatible(a, b)


# ------------------------------------------------------------------------------------- data

def test_empty_data_sets(small):
    model, specs, f = small
    with pytest.raises(ValueError, match="empty data set"):
        fit_ekfac(model, specs, EMPTY, FitSettings(), PAD)
    with pytest.raises(ValueError, match="empty data set"):
        covariance_sums(model, specs, EMPTY, FitSettings(), PAD)
    with pytest.raises(ValueError, match="no queries"):
        measurement_gradients(model, specs, EMPTY)
    grads = measurement_gradients(model, specs, random_pairs(2, (2, 3), (1, 2), seed=2), pad_id=PAD)
    ih = query_ihvps(grads, specs, "ss_if", ft_factors=f)
    with pytest.raises(ValueError, match="no documents"):
        score_documents(model, ih, EMPTY)
    # documents too short to hold a target are dropped and counted
    enc = encode_documents(CharTokenizer(), ["", "a", "abc"], max_length=8)
    assert (len(enc), enc.n_dropped, enc.kept) == (1, 2, [2])


def test_documents_longer_than_max_length_are_truncated_and_counted(small, caplog, tmp_path):
    tok = CharTokenizer()
    texts = ["abcdefghijkl", "abc", "abcdefghi"]
    with caplog.at_level(logging.WARNING, logger="msif_core.data"):
        enc = encode_documents(tok, texts, max_length=8)
    assert enc.n_truncated == 2 and "2 of 3 documents were longer than 8 tokens" in caplog.text
    assert [len(x) for x in enc.input_ids] == [8, 3, 8]
    assert enc.input_ids[0] == tok(texts[0])["input_ids"][:8]  # the start is kept
    model, specs, _ = small
    f = fit_ekfac(model, specs, enc, FitSettings(fisher="empirical"), PAD)
    assert f.manifest["truncated"] == 2 and f.manifest["tokens"] == 19
    # the sharded fit (the pipeline's map/reduce) carries the count through its Λ sums files
    settings = FitSettings(fisher="empirical")
    basis = eigenbasis(covariance_sums(model, specs, enc, settings, PAD), specs)
    part = lambda_sums(model, specs, enc, basis, settings, PAD)
    part.save(tmp_path / "lam.safetensors")
    back = LambdaSums.load(tmp_path / "lam.safetensors")
    assert (part.truncated, back.truncated) == (2, 2)
    assert finalize(model, specs, basis, merge_all([back, part]), settings).manifest["truncated"] == 4
    # a too-long pair keeps its whole completion (up to max_length - 1) and the end of its prompt
    pairs = encode_pairs(tok, ["abcdefgh", "ab"], ["xyz", "klmnopqrstuv"], max_length=6)
    assert pairs.n_truncated == 2
    assert pairs.input_ids[0] == tok("fgh")["input_ids"] + tok("xyz")["input_ids"]
    assert pairs.loss_mask[0] == [False] * 3 + [True] * 3
    assert pairs.input_ids[1] == tok("b")["input_ids"] + tok("klmno")["input_ids"]
    assert pairs.loss_mask[1] == [False] + [True] * 5
    with pytest.raises(ValueError, match="at least 2"):
        encode_documents(tok, texts, max_length=1)
    # texts for a classification head are truncated, counted and reported too
    with caplog.at_level(logging.WARNING, logger="msif_core.data"):
        cls = encode_classification(tok, texts, [0, 1, 0], max_length=8)
    assert cls.n_truncated == 2 and "2 of 3 texts were longer than 8 tokens" in caplog.text


# ---------------------------------------------------------------------------------- numerics

def test_non_finite_covariances_name_the_block(small):
    model, specs, _ = small
    sums = covariance_sums(model, specs, random_docs(3, 3, 5, seed=3), FitSettings(fisher="empirical"), PAD)
    bad = specs[2]  # an MLP module
    sums.s[bad.name][0, 1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=f"gradient covariance S in block {bad.blocks[0].name}") as e:
        eigenbasis(sums, specs)
    assert "dtype" in str(e.value)
    qkv = specs[0]
    sums = covariance_sums(model, specs, random_docs(3, 3, 5, seed=3), FitSettings(fisher="empirical"), PAD)
    sums.s[qkv.name][4] = float("inf")  # head 1, role k of an interleaved fused projection
    with pytest.raises(FloatingPointError, match=r"block gpt_neox\.layers\.0\.attention\.query_key_value\[h1\.k\]"):
        eigenbasis(sums, specs)
    with pytest.raises(FloatingPointError, match=r"query_key_value \(block 4\)"):
        eigenbasis(sums)
    sums = covariance_sums(model, specs, random_docs(3, 3, 5, seed=3), FitSettings(fisher="empirical"), PAD)
    sums.a[qkv.name][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=f"activation covariance A in module {qkv.name}"):
        eigenbasis(sums)
    with pytest.raises(ValueError, match="no tokens"):
        eigenbasis(CovarianceSums(sums.a, sums.s, 0, 0))


def test_an_eigendecomposition_that_does_not_converge_falls_back_then_is_named(small, monkeypatch, caplog):
    model, specs, _ = small
    sums = covariance_sums(model, specs, random_docs(3, 3, 5, seed=3), FitSettings(fisher="empirical"), PAD)
    real = torch.linalg.eigh

    def broken(x, *args, **kw):  # as LAPACK's eigh can fail on an extreme matrix
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with caplog.at_level(logging.WARNING, logger="msif_core.ekfac"):
        fallback = eigenbasis(sums, specs)
    assert "using the SVD instead" in caplog.text
    monkeypatch.setattr(torch.linalg, "eigh", real)
    for s in specs:  # the SVD's basis diagonalises each covariance, eigenvalues ascending like eigh's
        for name, c, q in (("A", sums.a[s.name][None], fallback.q_a[s.name][None]),
                           ("S", sums.s[s.name], fallback.q_s[s.name])):
            rot = q.transpose(-1, -2) @ (c / sums.tokens) @ q
            diag = rot.diagonal(dim1=-2, dim2=-1)
            assert_scaled_close(rot, torch.diag_embed(diag), f"Qᵀ {name} Q of {s.name}", tol=1e-10)
            assert_scaled_close(diag, torch.linalg.eigvalsh(c / sums.tokens), f"eigenvalues of {name}", tol=1e-10)
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(FloatingPointError, match=f"activation covariance A of module {specs[0].name} did not "
                                                 "converge.*module_tags"):
        eigenbasis(sums, specs)


def test_a_model_that_overflows_is_reported(small):
    model, specs, _ = small
    broken = tiny_model("gpt_neox", seed=4)
    with torch.no_grad():
        broken.get_submodule(specs[-1].name).weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        fit_ekfac(broken, specs, random_docs(3, 3, 5, seed=3), FitSettings(fisher="empirical"), PAD)


# ----------------------------------------------------------------------- factor files

def test_factors_of_another_model_are_refused(tmp_path, small):
    model, specs, f = small
    f.save(tmp_path / "f")
    other = tiny_model("gpt_neox", seed=5)
    with pytest.raises(ValueError, match="fitted on another model"):
        Factors.load(tmp_path / "f", expect_fingerprint=fingerprint(other, discover_modules(other)))
    # the same weights under another block layout are another model too
    with pytest.raises(ValueError, match="fitted on another model"):
        Factors.load(tmp_path / "f", expect_fingerprint=fingerprint(model, discover_modules(model, "fused")))
    assert Factors.load(tmp_path / "f", expect_fingerprint=fingerprint(model, specs)).manifest["fingerprint"]
    # weights outside the analysed blocks shape a and ds too: a changed norm, embedding or head is another model
    names = {s.name for s in specs}
    outside = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] not in names]
    assert any("norm" in n for n in outside) and any("embed" in n for n in outside)
    for name in [next(n for n in outside if "norm" in n), next(n for n in outside if "embed" in n)]:
        changed = copy.deepcopy(model)
        with torch.no_grad():
            changed.get_parameter(name).view(-1)[0] += 1e-3
        with pytest.raises(ValueError, match="fitted on another model"):
            Factors.load(tmp_path / "f", expect_fingerprint=fingerprint(changed, specs))
    with pytest.raises(FileNotFoundError, match="holds no EK-FAC factors"):
        Factors.load(tmp_path / "nothing")
    man = json.loads((tmp_path / "f" / "manifest.json").read_text())
    # factors from before the fingerprint covered every weight: refused as such, not as "another model"
    (tmp_path / "f" / "manifest.json").write_text(json.dumps({k: v for k, v in man.items()
                                                              if k != "fingerprint_version"}))
    with pytest.raises(ValueError, match="written by an older msif.*version 1.*may be unchanged"):
        Factors.load(tmp_path / "f", expect_fingerprint=fingerprint(model, specs))
    (tmp_path / "f" / "manifest.json").write_text(json.dumps(man | {"format": "other"}))
    with pytest.raises(ValueError, match="unknown factors format"):
        Factors.load(tmp_path / "f")


def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as fh:
        fh.write(b"half")
    raise OSError("disk full")


def test_failed_saves_leave_nothing_half_written(tmp_path, small, monkeypatch):
    model, specs, f = small
    monkeypatch.setattr(ekfac_module, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        f.save(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    f.save(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    monkeypatch.setattr(ekfac_module, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        f.save(tmp_path / "old")
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # the previous factors are intact
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    monkeypatch.undo()

    grads = measurement_gradients(model, specs, random_pairs(2, (2, 3), (1, 2), seed=2), pad_id=PAD)
    ih = query_ihvps(grads, specs, "ss_if", ft_factors=f)
    monkeypatch.setattr(ekfac_module, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        ih.save(tmp_path / "ihvps")
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no query iHVPs"):
        QueryIHVPs.load(tmp_path / "ihvps")
    # the covariance/Λ shard files are atomic too
    sums = covariance_sums(model, specs, random_docs(2, 3, 4, seed=4), FitSettings(fisher="empirical"), PAD)
    monkeypatch.setattr(ekfac_module, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        sums.save(tmp_path / "shard0.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_misused_options_are_refused(small):
    model, specs, f = small
    grads = measurement_gradients(model, specs, random_pairs(2, (2, 3), (1, 2), seed=2), pad_id=PAD)
    with pytest.raises(ValueError, match="method must be one of"):
        query_ihvps(grads, specs, "if")
    with pytest.raises(ValueError, match="fine-tuned model's EK-FAC factors"):
        query_ihvps(grads, specs, "ss_if")
    with pytest.raises(ValueError, match="pre-trained model's EK-FAC factors"):
        query_ihvps(grads, specs, "ms_if", ft_factors=f)
    ih = query_ihvps(grads, specs, "gdp")
    with pytest.raises(ValueError, match="needs rank-r"):
        score_documents(model, ih, random_docs(2, 3, 4, seed=5), strategy="low_rank")
    with pytest.raises(ValueError, match="fisher must be"):
        fit_ekfac(model, specs, random_docs(2, 3, 4, seed=5), FitSettings(fisher="exact"), PAD)
    with pytest.raises(ValueError, match="attention_blocks"):
        discover_modules(model, attention_blocks="per_layer")
    with pytest.raises(ValueError, match="not in the model"):
        discover_modules(model, module_tags={"gpt_neox.layers.9.mlp": "mlp"})
