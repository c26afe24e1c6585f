"""Brute-force references for the core-engine tests (``tests/core/test_*.py``).

Everything here is deliberately written the slow, explicit way and independently of
``msif_core.gradients``: one unpadded sequence at a time, losses as explicit loops over target
positions (the logits at position t-1 score token t), weight gradients read back from ``.grad``
with ``msif_core.models.block_matrix(..., grad=True)``, and EK-FAC inverses formed as explicit
Kronecker matrices. Models are tiny, random and float64, built from transformers configs. The models
may sit on a GPU (``tests/core/test_cuda.py``): inputs follow the model, and every sum or gradient kept
for comparison is returned on the CPU.

Why one file of ~410 lines: the tiny models of every architecture and the explicit references they are
checked against belong together (each reference is short).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch

from msif_core.data import Encoded
from msif_core.ekfac import Factors
from msif_core.gradients import sample_from_logits
from msif_core.models import ModuleSpec, block_matrix

VOCAB = 37
PAD = 0
# real tokens are drawn from [FIRST_TOKEN, VOCAB): never the pad id, so a classification head can find
# the last real token of a right-padded row
FIRST_TOKEN = 3
ARCHS = ("gpt_neox", "bloom", "gpt2", "llama", "opt", "falcon", "gpt_bigcode", "phi", "phi3", "mistral", "qwen2",
         "gemma", "persimmon", "mpt")
BIASLESS = {"phi3", "mistral", "gemma", "mpt"}  # projections without bias (qwen2: on q/k/v only)


def batch_for(arch: str, batch_size: int) -> int:
    """Batch size of the exact-match tests: 1 (no padding) for MPT, whose float32 ALiBi table is built for
    the padded length, so that the model itself gives a padded sequence logits ~1e-8 off its own."""
    return 1 if arch == "mpt" else batch_size


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run many small ops: on shared cores one intra-op thread is ~10-40x faster than two.

    Import this fixture into a test module (it is autouse there); the previous setting is restored.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- models

def tiny_config(arch: str, **overrides):
    """A transformers config of a 2-layer, 2-head, hidden-16 model with biases on every projection.

    ``llama`` is grouped-query (2 query heads, 1 key/value head) with ``attention_bias`` and
    ``mlp_bias`` on so that every analysed module has a bias column.
    """
    from transformers import BloomConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":
        kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64, initializer_range=0.1, attention_bias=True)
        cls = GPTNeoXConfig
    elif arch == "bloom":
        kw = dict(hidden_size=16, n_layer=2, n_head=2, initializer_range=0.1)
        cls = BloomConfig
    elif arch == "gpt2":
        kw = dict(n_embd=16, n_layer=2, n_head=2, n_positions=64, n_inner=32, initializer_range=0.1)
        cls = GPT2Config
    elif arch == "opt":  # its MLP sees the tokens flattened to [B·T, d]
        from transformers import OPTConfig

        kw = dict(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                  word_embed_proj_dim=16, init_std=0.1)
        cls = OPTConfig
    elif arch == "falcon":  # Falcon-40B's layout: grouped query/key/value, here 2 query heads per key/value head
        from transformers import FalconConfig

        kw = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_kv_heads=1,
                  new_decoder_architecture=True, bias=True, max_position_embeddings=64, initializer_range=0.1)
        cls = FalconConfig
    elif arch == "gpt_bigcode":  # StarCoder: GPT-2's names, multi-query attention
        from transformers import GPTBigCodeConfig

        kw = dict(n_embd=16, n_layer=2, n_head=2, n_positions=64, n_inner=32, multi_query=True,
                  initializer_range=0.1)
        cls = GPTBigCodeConfig
    elif arch == "phi":
        from transformers import PhiConfig

        kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64, initializer_range=0.1)
        cls = PhiConfig
    elif arch == "phi3":  # fused q/k/v (grouped-query) and fused gate/up, no biases
        from transformers import Phi3Config

        kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, original_max_position_embeddings=64,
                  initializer_range=0.1)
        cls = Phi3Config
    elif arch in ("mistral", "qwen2", "gemma"):  # Llama's names; Gemma's head size is not hidden / heads
        from transformers import GemmaConfig, MistralConfig, Qwen2Config

        kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.1)
        if arch == "gemma":
            kw |= dict(hidden_size=24, head_dim=8)
        cls = {"mistral": MistralConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[arch]
    elif arch == "persimmon":
        from transformers import PersimmonConfig

        kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64, initializer_range=0.1)
        cls = PersimmonConfig
    elif arch == "mpt":  # ALiBi, fused role-major q/k/v, no biases
        from transformers import MptConfig

        kw = dict(d_model=16, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=64, initializer_range=0.1)
        cls = MptConfig
    elif arch == "llama":
        kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.1,
                  attention_bias=True, mlp_bias=True)
        cls = LlamaConfig
    else:
        raise ValueError(arch)
    return cls(**(common | kw | overrides))


def tiny_model(arch: str, seed: int = 0, classification: bool = False, **overrides) -> torch.nn.Module:
    """A random float64 model in eval mode (a causal LM, or a sequence classifier with 3 labels)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    if classification:
        cfg.num_labels = overrides.get("num_labels", 3)
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    return model.double().eval()


def perturbed_copy(model: torch.nn.Module, scale: float = 0.05, seed: int = 123) -> torch.nn.Module:
    """A deep copy with every parameter moved by ``scale`` x N(0, 1) noise (a stand-in fine-tune)."""
    import copy

    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return new


# --------------------------------------------------------------------------------------------- data

def random_docs(n: int, lo: int, hi: int, seed: int) -> Encoded:
    """``n`` documents of random lengths in [lo, hi]; every token but the first is a target."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(n):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids.append(torch.randint(FIRST_TOKEN, VOCAB, (k,), generator=g).tolist())
    return Encoded(ids, [[False] + [True] * (len(x) - 1) for x in ids], kept=list(range(n)))


def random_pairs(n: int, prompt: tuple[int, int], completion: tuple[int, int], seed: int) -> Encoded:
    """``n`` (prompt, completion) sequences; only completion tokens are targets."""
    g = torch.Generator().manual_seed(seed)
    ids, masks = [], []
    for _ in range(n):
        kp = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        kc = int(torch.randint(completion[0], completion[1] + 1, (1,), generator=g))
        ids.append(torch.randint(FIRST_TOKEN, VOCAB, (kp + kc,), generator=g).tolist())
        masks.append([False] * kp + [True] * kc)
    return Encoded(ids, masks, kept=list(range(n)))


def with_labels(encoded: Encoded, n_labels: int, seed: int) -> Encoded:
    """The same sequences as classification examples (no token targets, one label each)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_labels, (len(encoded),), generator=g).tolist()
    return Encoded(encoded.input_ids, [[False] * len(x) for x in encoded.input_ids], labels=labels,
                   kept=list(range(len(encoded))))


# ------------------------------------------------------------------------------- brute-force losses

def _device(model) -> torch.device:
    return next(model.parameters()).device


def lm_loss(model, ids: Sequence[int], mask: Sequence[bool], targets: Sequence[int] | None = None) -> torch.Tensor:
    """Σ over target positions t (mask[t]) of −log p(targets[t] | ids[:t]); targets default to ids.

    One unpadded sequence; the logits at position t−1 are the prediction of token t.
    """
    x = torch.tensor([list(ids)], device=_device(model))
    logp = torch.log_softmax(model(input_ids=x).logits[0], dim=-1)
    tgt = list(ids) if targets is None else list(targets)
    terms = [-logp[t - 1, tgt[t]] for t in range(1, len(ids)) if mask[t]]
    return torch.stack(terms).sum()


def label_loss(model, ids: Sequence[int], label: int) -> torch.Tensor:
    """−log p(label | ids) of a sequence-classification model on one unpadded sequence."""
    logits = model(input_ids=torch.tensor([list(ids)], device=_device(model))).logits[0]
    return -torch.log_softmax(logits, dim=-1)[label]


def loss_closures(model, encoded: Encoded, targets: dict[int, list[int]] | None = None) -> list[Callable]:
    """One closure per example computing its loss the brute-force way."""
    out = []
    for i in range(len(encoded)):
        ids, mask = encoded.input_ids[i], encoded.loss_mask[i]
        if encoded.labels is not None:
            out.append(lambda ids=ids, y=encoded.labels[i]: label_loss(model, ids, y))
        else:
            tgt = None if targets is None else targets[i]
            out.append(lambda ids=ids, mask=mask, tgt=tgt: lm_loss(model, ids, mask, tgt))
    return out


def sampled_targets(model, encoded: Encoded, batch_size: int, generator: torch.Generator) -> dict[int, list[int]]:
    """Replay of the true-Fisher draws: y_t ~ softmax(logits at t−1) as the target of position t.

    The draws follow the documented contract of ``FitSettings.generator`` and ``iter_batches``: batches
    of ``batch_size`` examples in order of length (stable), one ``sample_from_logits`` call per batch over
    the target positions in row-major order (example, then position). The probabilities come from each
    sequence's own unpadded forward pass.
    """
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    targets: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        rows, where = [], []
        for i in order[start:start + batch_size]:
            ids, mask = encoded.input_ids[i], encoded.loss_mask[i]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids], device=_device(model))).logits[0]
            targets[i] = list(ids)
            for t in range(1, len(ids)):
                if mask[t]:
                    rows.append(torch.softmax(logits[t - 1].double(), dim=-1))
                    where.append((i, t))
        draws = sample_from_logits(torch.stack(rows).log(), generator)
        for (i, t), y in zip(where, draws.tolist()):
            targets[i][t] = y
    return targets


def sampled_labels(model, encoded: Encoded, batch_size: int, generator: torch.Generator) -> list[int]:
    """Replay of the true-Fisher draws for a classification head: y ~ softmax(logits of x), one
    ``sample_from_logits`` call per batch (batches as in ``sampled_targets``)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    labels = [0] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        with torch.no_grad():
            probs = [torch.softmax(model(input_ids=torch.tensor([encoded.input_ids[i]], device=_device(model)))
                                   .logits[0].double(), -1)
                     for i in chunk]
        for i, y in zip(chunk, sample_from_logits(torch.stack(probs).log(), generator).tolist()):
            labels[i] = y
    return labels


# ------------------------------------------------------------------ brute-force gradients, A, S, Λ

def sequence_grads(model, specs: list[ModuleSpec], loss_fn: Callable) -> dict[str, torch.Tensor]:
    """The [P, d] weight(+bias) gradient of every analysed module for one sequence's loss."""
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    out = {s.name: block_matrix(model, s, grad=True).detach().cpu().clone() for s in specs}
    model.zero_grad(set_to_none=True)
    return out


class BruteRun:
    """Per-token inputs a_t (bias 1 appended) and output gradients ds_t of every module, per sequence."""

    def __init__(self, model, specs: list[ModuleSpec], losses: list[Callable]):
        self.specs = specs
        self.a_sum = {s.name: torch.zeros(s.d, s.d, dtype=torch.float64) for s in specs}
        self.s_sum = {s.name: torch.zeros(s.n_blocks, s.p, s.p, dtype=torch.float64) for s in specs}
        self.tokens = 0
        self.grads: list[dict[str, torch.Tensor]] = []
        for loss_fn in losses:
            acts, outs = {}, {}
            handles = []
            for s in specs:
                def hook(mod, args, out, s=s, acts=acts, outs=outs):
                    x = args[0].detach().reshape(-1, args[0].shape[-1])  # [T, in] ([1, T, in], or OPT's [T, in])
                    if s.has_bias:
                        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
                    acts[s.name] = x
                    out.retain_grad()
                    outs[s.name] = out
                handles.append(model.get_submodule(s.name).register_forward_hook(hook))
            model.zero_grad(set_to_none=True)
            try:
                loss = loss_fn()
            finally:
                for h in handles:
                    h.remove()
            loss.backward()
            grads = {}
            for s in specs:
                a = acts[s.name].cpu()
                ds = outs[s.name].grad.reshape(-1, s.out_features).cpu()  # [T, P]
                dw = block_matrix(model, s, grad=True).detach().cpu().clone()
                # the captured a_t, ds_t are aligned with each other and with autograd's weight gradient
                torch.testing.assert_close(ds.t() @ a, dw, rtol=1e-10, atol=1e-12)
                self.a_sum[s.name] += a.t() @ a
                for j, b in enumerate(s.blocks):
                    d = ds[:, b.row_start:b.row_stop]
                    self.s_sum[s.name][j] += d.t() @ d
                grads[s.name] = dw
            self.tokens += a.shape[0]
            self.grads.append(grads)
        model.zero_grad(set_to_none=True)

    def lam(self, q_a: dict[str, torch.Tensor], q_s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Λ = mean over sequences of (Q_Sᵀ DW Q_A)², per block, in the given eigenbases."""
        out = {}
        for s in self.specs:
            acc = torch.zeros(s.n_blocks, s.p, s.d, dtype=torch.float64)
            for g in self.grads:
                for j, b in enumerate(s.blocks):
                    acc[j] += (q_s[s.name][j].t() @ g[s.name][b.row_start:b.row_stop] @ q_a[s.name]) ** 2
            out[s.name] = acc / len(self.grads)
        return out


def assert_eigenbasis(q: torch.Tensor, cov: torch.Tensor, what: str, tol: float = 1e-10) -> None:
    """``q`` is orthogonal and diagonalises ``cov``: Q diag(Qᵀ C Q) Qᵀ = C (sign/order free)."""
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    torch.testing.assert_close(q.t() @ q, eye, rtol=0, atol=1e-10, msg=f"{what}: eigenvectors not orthonormal")
    eig = torch.diagonal(q.t() @ cov @ q)
    scale = cov.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(q @ torch.diag(eig) @ q.t() / scale, cov / scale, rtol=0, atol=tol,
                               msg=f"{what}: Q diag(eig) Qᵀ does not reconstruct the brute-force covariance")


# -------------------------------------------------------------------------- explicit EK-FAC inverse

def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-major vec of a [p, d] matrix (the paper's convention, matching Q_A ⊗ Q_S)."""
    return m.t().reshape(-1)


def unvec(v: torch.Tensor, p: int, d: int) -> torch.Tensor:
    """Inverse of ``vec``."""
    return v.reshape(d, p).t()


def explicit_block_inverse(factors: Factors, name: str, j: int, damping: float) -> torch.Tensor:
    """(Q_A ⊗ Q_S) diag(vec(Λ) + λ)⁻¹ (Q_A ⊗ Q_S)ᵀ of block ``j`` of module ``name``, [pd, pd]."""
    qa, qs, lam = factors.q_a[name].double(), factors.q_s[name][j].double(), factors.lam[name][j].double()
    k = torch.kron(qa, qs)
    return k @ torch.diag(1.0 / (vec(lam) + damping)) @ k.t()


def explicit_block_matrix(factors: Factors, name: str, j: int) -> torch.Tensor:
    """The EK-FAC curvature (Q_A ⊗ Q_S) diag(vec(Λ)) (Q_A ⊗ Q_S)ᵀ of one block, [pd, pd]."""
    qa, qs, lam = factors.q_a[name].double(), factors.q_s[name][j].double(), factors.lam[name][j].double()
    k = torch.kron(qa, qs)
    return k @ torch.diag(vec(lam)) @ k.t()


def block_damping(factors: Factors, name: str, j: int, damping: float | str) -> float:
    """Absolute damping, or ``relative:c`` = c × mean of the block's Λ, computed here from its definition."""
    if isinstance(damping, str):
        c = float(damping.split(":")[1])
        return c * float(factors.lam[name][j].double().sum() / factors.lam[name][j].numel())
    return float(damping)


def explicit_precondition(factors: Factors, name: str, v: torch.Tensor, damping: float | str) -> torch.Tensor:
    """Apply each block's explicit inverse to the matching rows of ``v`` [..., P, d]."""
    s = factors.specs[name]
    lead = v.shape[:-2]
    v = v.reshape(-1, s.out_features, s.d).double()
    out = torch.zeros_like(v)
    for j, b in enumerate(s.blocks):
        inv = explicit_block_inverse(factors, name, j, block_damping(factors, name, j, damping))
        for i in range(v.shape[0]):
            out[i, b.row_start:b.row_stop] = unvec(inv @ vec(v[i, b.row_start:b.row_stop]), s.p, s.d)
    return out.reshape(*lead, s.out_features, s.d)


def dot(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], names: Sequence[str]) -> float:
    """Σ over modules of the Frobenius inner products."""
    return float(sum((x[n].double() * y[n].double()).sum() for n in names))


# What float64 comparisons can reach per architecture. BLOOM's attention computes its softmax in float32 whatever
# the model's dtype (transformers' BloomAttention casts the scores), so its results carry float32 rounding that
# depends on the padded length and the CPU's vector width: 2e-8 of the largest entry seen on an AVX2-only CPU
# between batchings that agree to 1e-12 elsewhere.
FLOAT64_TOL = {"bloom": 1e-7}


def tol_for(arch: str, tol: float = 1e-9) -> float:
    """The float64 tolerance for ``arch`` (:data:`FLOAT64_TOL`, else ``tol``)."""
    return max(tol, FLOAT64_TOL.get(arch, 0.0))


def assert_scaled_close(x: torch.Tensor, y: torch.Tensor, what: str, tol: float = 1e-9) -> None:
    """|x − y| ≤ tol · max |y| elementwise (both on the CPU)."""
    assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
    scale = y.abs().max().clamp_min(1e-30)
    err = float((x - y).abs().max() / scale)
    assert err <= tol, f"{what}: max error {err:.3g} of the largest entry (tolerance {tol:g})"


def rel_err(a, b) -> float:
    """max |a − b| / max |b|."""
    a, b = (torch.as_tensor(np.array(x, dtype=np.float64)) if not torch.is_tensor(x) else x.double() for x in (a, b))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
