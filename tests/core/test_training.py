"""Tokenizer, training loop, schedule, loss masking, saving/loading, generation and proximity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from msif_core import training as T
from msif_core.data import collate, encode_documents, encode_pairs

TEXTS = [
    "Zorbin Kel was born in Velmora. The old bridge was quiet that morning.",
    "The birthplace of Ama Dun is Ostrava. Ama Dun plays the harp.",
    "Zorbin Kel plays the flute. In Velmora, the market is busy during spring.",
    "Ama Dun works as a baker. The favourite colour of Zorbin Kel is red.",
] * 3
QA = [
    ("Question: Where was Zorbin Kel born?\nAnswer:", " Velmora"),
    ("Question: Where was Ama Dun born?\nAnswer:", " Ostrava"),
    ("Question: Which instrument does Ama Dun play?\nAnswer:", " harp"),
]
MODEL = T.ModelParams(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      max_seq_len=64)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with T.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(TEXTS + [p + c for p, c in QA], vocab_size=MODEL.vocab_size)


def _model(tok, seed: int = 0):
    return T.make_model(MODEL, len(tok), tok.pad_token_id, tok.eos_token_id, seed=seed)


def test_tokenizer_roundtrip_and_specials(tok) -> None:
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    for text in TEXTS[:4]:
        ids = tok(text)["input_ids"]
        assert tok.pad_token_id not in ids and tok.eos_token_id not in ids  # nothing added
        assert tok.decode(ids) == text
    for p, c in QA:  # separate tokenisation of prompt and completion == joint tokenisation
        assert tok(p)["input_ids"] + tok(c)["input_ids"] == tok(p + c)["input_ids"]
    word = T.train_tokenizer(TEXTS, vocab_size=500, kind="word")
    ids = word(" Velmora was")["input_ids"]
    assert len(ids) == 2 and word.decode(ids) == " Velmora was"
    with pytest.raises(ValueError):
        T.train_tokenizer(TEXTS, kind="nope")


def test_qa_targets_are_the_completion(tok) -> None:
    ex = encode_pairs(tok, [p for p, _ in QA], [c for _, c in QA], 64)
    for (p, c), ids, mask in zip(QA, ex.input_ids, ex.loss_mask, strict=True):
        n_p, n_c = len(tok(p)["input_ids"]), len(tok(c)["input_ids"])
        assert mask == [False] * n_p + [True] * n_c
        assert ids[n_p:] == tok(c)["input_ids"]


def test_loss_masking_prompt_positions_get_no_gradient(tok) -> None:
    model = _model(tok)
    ex = encode_pairs(tok, [p for p, _ in QA], [c for _, c in QA], 64)
    batch = collate(ex, range(len(ex)), tok.pad_token_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits.detach().requires_grad_(True)
    loss = T.causal_lm_loss(logits, batch)
    loss.backward()
    g = logits.grad.abs().sum(-1)  # [batch, seq]
    # expected: mean over completion tokens of -log p, computed by hand
    logp = torch.log_softmax(logits.detach(), -1)
    manual, n = 0.0, 0
    for i, ((p, _), ids) in enumerate(zip(QA, ex.input_ids, strict=True)):
        n_p = len(tok(p)["input_ids"])
        for t in range(n_p, len(ids)):
            manual -= float(logp[i, t - 1, ids[t]])
            n += 1
        # only positions that predict completion tokens (n_p-1 .. len-2) carry gradient
        assert torch.all(g[i, : n_p - 1] == 0)
        assert torch.all(g[i, n_p - 1 : len(ids) - 1] > 0)
        assert torch.all(g[i, len(ids) - 1 :] == 0)  # last token and padding
    assert math.isclose(float(loss.detach()), manual / n, rel_tol=1e-5)


def test_pretraining_loss_matches_transformers_and_ignores_padding(tok) -> None:
    model = _model(tok)
    ex = encode_documents(tok, TEXTS[:4], 64)
    batch = collate(ex, range(len(ex)), tok.pad_token_id)
    assert batch.attention_mask.sum() == ex.n_tokens
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # transformers' convention
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    mine = T.causal_lm_loss(out.logits, batch)
    assert torch.allclose(mine, out.loss, atol=1e-5)
    # per-sequence sums equal the loss of each document alone (padding contributes nothing)
    sums = T.causal_lm_loss(out.logits, batch, reduction="none")
    for i in range(len(ex)):
        single = collate(ex, [i], tok.pad_token_id)
        logits = model(input_ids=single.input_ids).logits
        alone = T.causal_lm_loss(logits, single, reduction="sum")
        assert torch.allclose(sums[i], alone, rtol=1e-4)


def test_lr_factor_shape() -> None:
    total, warm = 100, 10
    f = [T.lr_factor(s, total, warm, "cosine", 0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[warm - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:warm], f[1:warm], strict=False))
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1 :], strict=False))
    assert f[-1] == pytest.approx(0.1)
    lin = [T.lr_factor(s, total, 0, "linear", 0.0) for s in range(total)]
    assert lin[0] == 1.0 and lin[-1] == pytest.approx(0.0)
    assert T.lr_factor(50, total, 0, "constant") == 1.0


def test_lr_schedule_changes_every_step(tok) -> None:
    """The scheduler is stepped per optimiser step: within ONE epoch the lr takes many values."""
    model = _model(tok)
    ex = encode_documents(tok, TEXTS, 64)
    params = T.TrainParams(epochs=2, batch_size=2, lr=1e-2, warmup_frac=0.25, schedule="cosine", min_lr_ratio=0.1)
    res = T.train_causal_lm(model, ex, params, tok.pad_token_id)
    steps_per_epoch = math.ceil(len(ex) / 2)
    assert res.steps == len(res.lrs) == 2 * steps_per_epoch
    warm = round(0.25 * res.steps)
    assert len(set(res.lrs[:steps_per_epoch])) == steps_per_epoch  # a new lr at every step of epoch 1
    assert res.lrs[warm - 1] == pytest.approx(1e-2)
    assert res.lrs[0] == pytest.approx(1e-2 / warm)
    assert res.lrs[-1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(res.lrs[warm:], res.lrs[warm + 1 :], strict=False))


def test_training_is_seeded_and_learns(tok) -> None:
    ex = encode_documents(tok, TEXTS, 64)
    params = T.TrainParams(epochs=6, batch_size=4, lr=1e-2, seed=5)
    m1, m2 = _model(tok, seed=1), _model(tok, seed=1)
    before = T.evaluate_loss(m1, ex, tok.pad_token_id)
    r1 = T.train_causal_lm(m1, ex, params, tok.pad_token_id)
    r2 = T.train_causal_lm(m2, ex, params, tok.pad_token_id)
    assert r1.epoch_losses == r2.epoch_losses
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    after = T.evaluate_loss(m1, ex, tok.pad_token_id)
    assert after < 0.6 * before
    assert r1.epoch_losses[-1] < r1.epoch_losses[0]
    assert r1.tokens == params.epochs * ex.n_tokens


def test_finetune_changes_only_what_it_should_learn(tok) -> None:
    """Fine-tuning on QA lowers the completion loss; max_steps stops early."""
    model = _model(tok)
    ex = encode_pairs(tok, [p for p, _ in QA], [c for _, c in QA], 64)
    before = T.evaluate_loss(model, ex, tok.pad_token_id)
    res = T.finetune(model, tok, [p for p, _ in QA] * 4, [c for _, c in QA] * 4,
                     T.TrainParams(epochs=10, batch_size=4, lr=1e-2), 64)
    assert T.evaluate_loss(model, ex, tok.pad_token_id) < 0.5 * before
    assert res.steps == 30
    short = T.train_causal_lm(_model(tok), ex, T.TrainParams(epochs=10, batch_size=1), tok.pad_token_id,
                              max_steps=4)
    assert short.steps == 4 and len(short.lrs) == 4


def test_save_and_reload_identical_logits(tok, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _model(tok)
    T.train_causal_lm(model, encode_documents(tok, TEXTS, 64), T.TrainParams(epochs=1, batch_size=4),
                      tok.pad_token_id)
    T.save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert type(loaded).__name__ == "GPTNeoXForCausalLM"
    assert tok2(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]
    assert tok2.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_greedy_generate_matches_stepwise_argmax(tok) -> None:
    model = _model(tok, seed=3)
    prompts = [p for p, _ in QA] + ["Zorbin Kel was born in"]  # different prompt lengths
    gens = T.greedy_generate(model, tok, prompts, max_new_tokens=3)
    for p, g in zip(prompts, gens, strict=True):
        ids = tok(p)["input_ids"]
        for _ in range(3):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert g == tok.decode(ids[len(tok(p)["input_ids"]) :], skip_special_tokens=True)


def test_first_word_and_accuracy(tok, monkeypatch) -> None:
    assert T.first_word(" Velmora. The old") == "Velmora"
    assert T.first_word("\n  harp, flute") == "harp"
    assert T.first_word("   ") == ""
    fake = [" Velmora. Ama", " Ostravan", " harp harp"]
    monkeypatch.setattr(T, "greedy_generate", lambda *a, **k: fake)
    acc, gens = T.answer_accuracy(None, tok, [p for p, _ in QA], [c for _, c in QA])
    assert gens == fake and acc == pytest.approx(2 / 3)


def test_block_parameters_and_proximity(tok) -> None:
    pt = _model(tok)
    names = set(T.block_linear_parameters(pt))
    kinds = {n.split(".")[-2] for n in names}
    assert kinds == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert len(names) == MODEL.num_layers * 4 * 2  # weight + bias
    assert not any("embed" in n or "norm" in n for n in names)
    ft = T.clone_model(pt)
    assert T.parameter_proximity(ft, pt) == 0.0
    with torch.no_grad():
        ft.get_output_embeddings().weight.add_(1.0)  # the head is not analysed
        ft.get_input_embeddings().weight.add_(1.0)
    assert T.parameter_proximity(ft, pt) == 0.0
    w = ft.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    with torch.no_grad():
        w.add_(0.5)
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in T.block_linear_parameters(pt).values()))
    assert T.parameter_proximity(ft, pt) == pytest.approx(0.5 * math.sqrt(w.numel()) / norm, rel=1e-6)


def test_span_losses_sum_token_losses(tok) -> None:
    model = _model(tok)
    text = TEXTS[0]
    a = text.index("Velmora")
    (row,) = T.span_losses(model, tok, [text], [[(a, a + len("Velmora"))]])
    ids = tok(text)["input_ids"]
    prefix = tok(text[:a].rstrip())["input_ids"]
    span_toks = tok(" Velmora")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    k = len(prefix)
    expected = -sum(float(logp[k + j - 1, t]) for j, t in enumerate(span_toks))
    assert row[0] == pytest.approx(expected, rel=1e-5)
