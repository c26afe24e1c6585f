"""Blocks: discovery and labelling per architecture, the per-head partition checked against each
model's real attention internals, the [p, d] orientation of every block (GPT-2's transposed Conv1D),
and each block's iHVP against the explicit Kronecker inverse with absolute and relative damping.
"""

from __future__ import annotations

import pytest
import torch
from helpers.core import (
    ARCHS,
    PAD,
    block_damping,
    explicit_block_matrix,
    explicit_precondition,
    one_thread,  # noqa: F401  (autouse fixture)
    random_docs,
    tiny_model,
    unvec,
    vec,
)

from msif_core.ekfac import Factors, FitSettings, _per_sequence_branch, fit_ekfac
from msif_core.models import block_matrix, discover_blocks, discover_modules

# (query heads, key/value heads) of the tiny models
HEADS = {"gpt_neox": (2, 2), "bloom": (2, 2), "gpt2": (2, 2), "llama": (2, 1), "opt": (2, 2), "falcon": (2, 1),
         "gpt_bigcode": (2, 1), "phi": (2, 2), "phi3": (2, 1), "mistral": (2, 1), "qwen2": (2, 1), "gemma": (2, 1),
         "persimmon": (2, 2), "mpt": (2, 2)}
QKV_ROLES = ("q", "k", "v")
GATED = ("llama", "mistral", "qwen2", "gemma")  # separate gate, up and down projections


@pytest.fixture(scope="module")
def fitted():
    """Each architecture with factors fitted (true Fisher, the default) on a few padded documents."""
    out = {}
    for arch in ARCHS:
        model = tiny_model(arch, seed=2)
        specs = discover_modules(model)
        out[arch] = (model, specs, fit_ekfac(model, specs, random_docs(6, 3, 8, seed=21),
                                             FitSettings(batch_size=3), PAD))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_discovered_blocks(arch):
    model = tiny_model(arch)
    n_q, n_kv = HEADS[arch]
    blocks = discover_blocks(model)
    for layer in range(2):
        tag = f".{layer}."
        mine = [b for b in blocks if tag in b.module_name]
        qkv = [b for b in mine if b.role in QKV_ROLES]
        want = {(h, r) for r in QKV_ROLES for h in range(n_q if r == "q" else n_kv)}
        assert {(b.head, b.role) for b in qkv} == want and len(qkv) == len(want)
        assert all(b.kind == "mha" and b.p == 8 for b in qkv)
        assert sum(b.role == "o" for b in mine) == 1
        n_mlp = 3 if arch in GATED else 2  # gate, up, down vs in, out
        assert sum(b.kind == "mlp" for b in mine) == n_mlp
        assert len(mine) == len(want) + 1 + n_mlp
    assert not any("embed" in b.module_name or "lm_head" in b.module_name or "wte" in b.module_name
                   for b in blocks)
    # within a module, blocks tile the output rows exactly
    for s in discover_modules(model):
        rows = sorted((b.row_start, b.row_stop) for b in s.blocks)
        assert rows[0][0] == 0 and rows[-1][1] == s.out_features
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    fused = discover_modules(model, attention_blocks="fused")
    assert all(s.n_blocks == 1 for s in fused) and len(fused) == len(discover_modules(model))
    mlp = discover_modules(model, modules="mlp")
    assert mlp and all(s.kind == "mlp" for s in mlp) and len(mlp) == 2 * (3 if arch in GATED else 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_matrix_orientation(arch):
    """Every block's [p, d] matrix maps [x, 1] to exactly its rows of the module output."""
    model = tiny_model(arch)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    for s in discover_modules(model):
        mod = model.get_submodule(s.name)
        xi = x[..., :s.in_features]
        out = mod(xi)
        xa = torch.cat([xi, torch.ones_like(xi[..., :1])], dim=-1) if s.has_bias else xi
        assert out.shape[-1] == s.out_features
        for b in s.blocks:
            m = block_matrix(model, s, b)
            assert m.shape == (b.p, s.d)
            torch.testing.assert_close(xa @ m.t(), out[..., b.row_start:b.row_stop], rtol=1e-12, atol=1e-12)
    if arch == "gpt2":  # Conv1D stores the weight as [in, out]
        s = discover_modules(model)[0]
        assert s.layout == "conv1d"
        w = model.get_submodule(s.name).weight
        torch.testing.assert_close(block_matrix(model, s)[:, :-1], w.t())


# ------------------------------------------------------------------------- per-head partition

class _Capture:
    """Records each attention layer's per-head query/key/value states ([B, heads, T, head_size])."""

    def __init__(self, model, arch):
        self.states: list[dict[str, torch.Tensor]] = []
        self.matmuls = arch == "mpt"  # MPT computes attention with two torch.matmul calls per layer
        if self.matmuls:
            return
        if arch in ("falcon", "persimmon"):  # they split the fused projection in `_split_heads` ([B, T, heads, size])
            layers = model.transformer.h if arch == "falcon" else model.model.layers
            for layer in layers:
                attn = layer.self_attention if arch == "falcon" else layer.self_attn
                orig = attn._split_heads
                group = attn.num_heads // attn.num_kv_heads if getattr(attn, "new_decoder_architecture", False) else 1

                def split(fused, orig=orig, group=group):
                    q, k, v = (x.transpose(1, 2) for x in orig(fused))
                    # the new layout broadcasts each key/value head over its group: keep one of each
                    self.states.append({"q": q.detach().clone(), "k": k[:, ::group].detach().clone(),
                                        "v": v[:, ::group].detach().clone()})
                    return orig(fused)
                attn._split_heads = split
        elif arch == "bloom":  # BLOOM splits its fused projection in `_reshape`
            for layer in model.transformer.h:
                attn = layer.self_attention
                orig = attn._reshape

                def wrapped(fused, orig=orig):
                    q, k, v = orig(fused)
                    self.states.append({"q": q.detach().clone(), "k": k.detach().clone(), "v": v.detach().clone()})
                    return q, k, v
                attn._reshape = wrapped
        else:  # the rest hand q, k, v (after RoPE, before grouped-query repetition) to the attention function
            from transformers import AttentionInterface
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            def attention(module, q, k, v, mask, **kw):
                self.states.append({"q": q.detach().clone(), "k": k.detach().clone(), "v": v.detach().clone()})
                return sdpa_attention_forward(module, q, k, v, mask, **kw)
            AttentionInterface.register("msif_capture", attention)
            model.set_attn_implementation("msif_capture")
            assert model.config._attn_implementation == "msif_capture"

    def run(self, model, x):
        self.states = []
        if not self.matmuls:
            with torch.no_grad():
                model(input_ids=x)
            return self.states
        calls = []
        real = torch.matmul

        def record(a, b, *args, **kw):  # (q, kᵀ) for the scores, then (weights, v)
            calls.append((a.detach().clone(), b.detach().clone()))
            return real(a, b, *args, **kw)
        torch.matmul = record
        try:
            with torch.no_grad():
                model(input_ids=x)
        finally:
            torch.matmul = real
        for (q, kt), (_, v) in zip(calls[0::2], calls[1::2]):
            self.states.append({"q": q, "k": kt.transpose(-1, -2), "v": v})
        return self.states


def _perturb_rows(model, spec, block, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mod = model.get_submodule(spec.name)
    with torch.no_grad():
        delta = scale * torch.randn(block.p, spec.in_features, generator=g, dtype=torch.float64)
        if spec.layout == "conv1d":
            mod.weight[:, block.row_start:block.row_stop] += delta.t()
        else:
            mod.weight[block.row_start:block.row_stop] += delta
        if spec.has_bias:
            mod.bias[block.row_start:block.row_stop] += scale


@pytest.mark.parametrize("arch", ARCHS)
def test_per_head_partition_matches_the_attention_layout(arch):
    """Perturbing block (head h, role r) changes that head's r-states in its layer, and nothing else there."""
    _check_partition(tiny_model(arch, seed=3), arch, *HEADS[arch])


@pytest.mark.parametrize("overrides, heads", [
    (dict(new_decoder_architecture=False, multi_query=True, num_attention_heads=4), (4, 1)),  # Falcon-7B
    (dict(new_decoder_architecture=False, multi_query=False, num_kv_heads=2), (2, 2)),  # the original layout
    (dict(num_attention_heads=4, num_kv_heads=2), (4, 2)),  # Falcon-40B, two groups
], ids=["multi_query", "original", "two_groups"])
def test_per_head_partition_of_every_falcon_layout(overrides, heads):
    model = tiny_model("falcon", seed=3, **overrides)
    assert len(discover_modules(model)[0].blocks) == heads[0] + 2 * heads[1]
    _check_partition(model, "falcon", *heads)


def test_per_head_partition_of_gpt_bigcode_without_multi_query():
    """GPTBigCode shares GPT-2's names; without multi-query its c_attn interleaves q, k, v per head."""
    model = tiny_model("gpt_bigcode", seed=3, multi_query=False)
    _check_partition(model, "gpt_bigcode", 2, 2)


def _check_partition(model, arch: str, n_q: int, n_kv: int) -> None:
    cap = _Capture(model, arch)
    x = torch.randint(3, 37, (2, 6))
    base = cap.run(model, x)
    assert len(base) == 2
    assert base[0]["q"].shape[1] == n_q and base[0]["k"].shape[1] == n_kv and base[0]["v"].shape[1] == n_kv
    checked = 0
    for spec in discover_modules(model):
        for block in spec.blocks:
            if block.role not in QKV_ROLES:
                continue
            layer = int(spec.name.split(".")[-3])
            saved = {k: v.detach().clone() for k, v in model.get_submodule(spec.name).state_dict().items()}
            _perturb_rows(model, spec, block)
            new = cap.run(model, x)
            model.get_submodule(spec.name).load_state_dict(saved)
            for lay in range(layer):  # earlier layers untouched
                for r in QKV_ROLES:
                    torch.testing.assert_close(new[lay][r], base[lay][r], rtol=0, atol=0)
            for r in QKV_ROLES:
                for h in range(base[layer][r].shape[1]):
                    diff = (new[layer][r][:, h] - base[layer][r][:, h]).abs().max().item()
                    if (r, h) == (block.role, block.head):
                        assert diff > 1e-3, f"{block.name}: its own state {r}{h} did not change"
                    else:
                        assert diff == 0.0, f"{block.name}: perturbing it changed {r} of head {h} in layer {layer}"
            checked += 1
    assert checked == 2 * (n_q + 2 * n_kv)


# ------------------------------------------------------------------------------ iHVP per block

@pytest.mark.parametrize("damping", [1e-3, "relative:0.1"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ihvp_equals_explicit_kronecker_inverse(fitted, arch, damping):
    model, specs, f = fitted[arch]
    g = torch.Generator().manual_seed(4)
    for s in specs:
        v = torch.randn(3, s.out_features, s.d, generator=g, dtype=torch.float64)
        got = f.precondition(s.name, v, damping)
        assert got.shape == v.shape
        want = explicit_precondition(f, s.name, v, damping)
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-9)
        # and it solves (G + λ) x = v block by block
        for j, b in enumerate(s.blocks):
            lam = block_damping(f, s.name, j, damping)
            gx = explicit_block_matrix(f, s.name, j) @ vec(got[0, b.row_start:b.row_stop]) + lam * vec(
                got[0, b.row_start:b.row_stop])
            torch.testing.assert_close(unvec(gx, s.p, s.d), v[0, b.row_start:b.row_stop], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_ihvp_from_tokens_equals_explicit(fitted, arch):
    """Preconditioning a gradient Σ_t ds_t a_tᵀ from its tokens (both routes) = the explicit inverse."""
    model, specs, f = fitted[arch]
    g = torch.Generator().manual_seed(5)
    for s in specs:
        # auto picks the token route for few tokens, the dense one for many
        assert not _per_sequence_branch(s, 2) and _per_sequence_branch(s, 3 * s.d)
        for t in (2, 3 * s.d):
            ds = torch.randn(2, t, s.out_features, generator=g, dtype=torch.float64)
            a = torch.randn(2, t, s.d, generator=g, dtype=torch.float64)
            want = explicit_precondition(f, s.name, torch.einsum("mtp,mtd->mpd", ds, a), 1e-3)
            scale = want.abs().max()
            for route in ("auto", "tokens", "dense"):
                got = f.precondition_tokens(s.name, ds, a, 1e-3, route=route)
                torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="route"):
        f.precondition_tokens(specs[0].name, ds, a, 1e-3, route="fast")


@pytest.mark.parametrize("arch", ARCHS)
def test_two_stage_ihvp_equals_two_explicit_inverses(fitted, arch):
    """``precondition(..., then=other)`` = the other model's explicit inverse applied to this one's, from dense
    gradients and from tokens (MS-IF's P_pt P_ft ∇m with one change of eigenbasis in between)."""
    model, specs, first = fitted[arch]
    second = fit_ekfac(model, specs, random_docs(5, 2, 7, seed=33), FitSettings(batch_size=2, fisher="empirical"),
                       PAD)
    g = torch.Generator().manual_seed(6)
    for s in specs:
        ds = torch.randn(2, 3, s.out_features, generator=g, dtype=torch.float64)
        a = torch.randn(2, 3, s.d, generator=g, dtype=torch.float64)
        v = torch.einsum("mtp,mtd->mpd", ds, a)
        want = explicit_precondition(second, s.name, explicit_precondition(first, s.name, v, 1e-3), "relative:0.1")
        scale = want.abs().max()
        got = [first.precondition(s.name, v, 1e-3, then=second, then_damping="relative:0.1")]
        got += [first.precondition_tokens(s.name, ds, a, 1e-3, route=r, then=second, then_damping="relative:0.1")
                for r in ("tokens", "dense")]
        for x in got:
            torch.testing.assert_close(x / scale, want / scale, rtol=0, atol=1e-9)
    other = Factors(second.specs, {k: x[:-1, :-1] for k, x in second.q_a.items()}, second.q_s, second.lam, {})
    with pytest.raises(ValueError, match=f"module {specs[0].name} has different blocks"):
        first.precondition(specs[0].name, torch.zeros(1, specs[0].out_features, specs[0].d, dtype=torch.float64),
                           1e-3, then=other)


def test_vec_convention():
    """(Q_A ⊗ Q_S) vec(X) = vec(Q_S X Q_Aᵀ) with column-major vec: the formula the explicit inverse uses."""
    g = torch.Generator().manual_seed(0)
    qa, qs, x = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((5, 5), (3, 3), (3, 5)))
    torch.testing.assert_close(torch.kron(qa, qs) @ vec(x), vec(qs @ x @ qa.t()))


def test_damping_is_never_stored(fitted):
    model, specs, f = fitted["gpt_neox"]
    before = {n: t.clone() for n, t in f.lam.items()}
    g = torch.Generator().manual_seed(5)
    s = specs[0]
    v = torch.randn(s.out_features, s.d, generator=g, dtype=torch.float64)
    outs = [f.precondition(s.name, v, d) for d in (1e-2, 1e-2, "relative:0.5", 1e-2)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[3], rtol=0, atol=0)
    for n in f.lam:
        torch.testing.assert_close(f.lam[n], before[n], rtol=0, atol=0)


def test_relative_damping_is_per_block(fitted):
    model, specs, f = fitted["bloom"]
    s = next(s for s in specs if s.n_blocks > 1)
    d = f.damping_for(s.name, "relative:0.1")
    want = torch.tensor([0.1 * f.lam[s.name][j].mean().item() for j in range(s.n_blocks)], dtype=torch.float64)
    torch.testing.assert_close(d, want, rtol=1e-12, atol=0)
    assert d.unique().numel() == s.n_blocks, "each block gets its own mean"
    torch.testing.assert_close(f.damping_for(s.name, 1e-5), torch.full((s.n_blocks,), 1e-5, dtype=torch.float64))
    with pytest.raises(ValueError, match="relative"):
        f.damping_for(s.name, "0.1")


def test_factor_storage_size(fitted):
    model, specs, f = fitted["llama"]
    want = sum(s.d ** 2 + s.n_blocks * s.p ** 2 + s.d * s.out_features for s in specs)
    assert f.n_floats() == want


def test_projections_discovery_does_not_know_are_reported(caplog):
    """A projection of the layer stack that no known name matches (here one added to a GPT-NeoX layer) is
    left out with a warning naming it; the supported architectures give none."""
    import logging

    with caplog.at_level(logging.WARNING, logger="msif_core.models"):
        for arch in ARCHS:
            discover_modules(tiny_model(arch))
            discover_modules(tiny_model(arch), modules="mlp")
        assert "not analysed" not in caplog.text
        model = tiny_model("gpt_neox")
        model.gpt_neox.layers[1].adapter = torch.nn.Linear(16, 16)
        specs = discover_modules(model)
    assert "gpt_neox.layers.1.adapter" not in {s.name for s in specs}
    assert "1 linear projections of GPTNeoXForCausalLM are not analysed, e.g. gpt_neox.layers.1.adapter" in caplog.text
    assert "module_tags" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="msif_core.models"):
        discover_modules(model, module_tags={"gpt_neox.layers.1.adapter": "mlp"})  # the user chose: no warning
    assert "not analysed" not in caplog.text


def test_captures_fold_flattened_tokens_back_and_refuse_other_shapes():
    from msif_core.gradients import _per_token

    x = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    assert _per_token(x, 2, 3, "m") is x
    assert torch.equal(_per_token(x.reshape(6, 4), 2, 3, "m"), x)  # row-major over (sequence, position)
    with pytest.raises(ValueError, match="module head sees tensors of shape \\(2, 4\\).*leave it out of module_tags"):
        _per_token(x[:, 0], 2, 3, "head")
