"""Models and blocks: find the linear projections that influence analyses, and fingerprint a model.

A *module* is one linear projection inside a transformer block (``nn.Linear`` or GPT-2's ``Conv1D``).
A *block* is the unit EK-FAC treats as independent: a contiguous range of the module's output
features (rows). MLP projections and attention outputs are one block each; attention query/key/value
projections are split into one block per (head, role) that all share the module's input covariance
(SPEC section 2). The row ranges follow each architecture's real layout:

- interleaved per head (GPT-NeoX, BLOOM, Persimmon ``query_key_value``): rows ``[h0: q k v | h1: q k v | ...]``;
- role-major (GPT-2 ``c_attn``, MPT ``Wqkv``, Phi-3 ``qkv_proj`` with fewer key/value heads): rows
  ``[q: h0 h1 ... | k: ... | v: ...]``;
- grouped per key/value head (Falcon ``query_key_value``, GPTBigCode/StarCoder ``c_attn``): rows
  ``[g0: q.. k v | g1: q.. k v | ...]`` (one group for multi-query models, one per head otherwise);
- separate projections (Llama, OPT, Phi ``q_proj``/``k_proj``/``v_proj``, k and v possibly with fewer heads).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

ATTENTION_BLOCKS = ("per_head", "fused")
MODULE_SETS = ("all", "mlp")


@dataclass(frozen=True)
class Block:
    """One EK-FAC block: output rows ``[row_start, row_stop)`` of module ``module_name``."""

    name: str
    module_name: str
    kind: str  # "mlp" or "mha"
    role: str  # q, k, v, qkv, o, in, out, gate, up, down, or a user tag
    head: int | None
    row_start: int
    row_stop: int

    @property
    def p(self) -> int:
        """Number of output features (rows) in this block."""
        return self.row_stop - self.row_start


@dataclass(frozen=True)
class ModuleSpec:
    """An analysed linear module and the equal-sized contiguous blocks its output rows split into."""

    name: str
    kind: str
    layout: str  # "linear" (weight out x in) or "conv1d" (weight in x out, GPT-2)
    in_features: int
    out_features: int
    has_bias: bool
    blocks: tuple[Block, ...]

    @property
    def d(self) -> int:
        """Input dimension including the bias column."""
        return self.in_features + int(self.has_bias)

    @property
    def n_blocks(self) -> int:
        """Number of blocks the output rows are split into."""
        return len(self.blocks)

    @property
    def p(self) -> int:
        """Rows per block (all blocks of a module have the same size)."""
        return self.out_features // self.n_blocks

    def shape_key(self) -> tuple:
        """What must agree between two models for their factors/gradients to be combined."""
        return (self.layout, self.in_features, self.out_features, self.has_bias, self.n_blocks)

    def to_json(self) -> dict:
        """A JSON-serialisable description (for manifests)."""
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        return d

    @staticmethod
    def from_json(d: dict) -> ModuleSpec:
        """Inverse of ``to_json``."""
        blocks = tuple(Block(**b) for b in d["blocks"])
        return ModuleSpec(**{**d, "blocks": blocks})


# (suffix of the module name) -> (kind, role, qkv layout)
_KNOWN: dict[str, tuple[str, str, str]] = {
    # GPT-NeoX (Pythia, dolly)
    "attention.query_key_value": ("mha", "qkv", "interleaved"),
    "attention.dense": ("mha", "o", ""),
    "mlp.dense_h_to_4h": ("mlp", "in", ""),
    "mlp.dense_4h_to_h": ("mlp", "out", ""),
    # BLOOM
    "self_attention.query_key_value": ("mha", "qkv", "interleaved"),
    "self_attention.dense": ("mha", "o", ""),
    # GPT-2
    "attn.c_attn": ("mha", "qkv", "role_major"),
    "attn.c_proj": ("mha", "o", ""),
    "mlp.c_fc": ("mlp", "in", ""),
    "mlp.c_proj": ("mlp", "out", ""),
    # OPT (q/k/v as Llama's; its MLP runs on the tokens flattened to [B·T, d])
    "self_attn.out_proj": ("mha", "o", ""),
    "fc1": ("mlp", "in", ""),
    "fc2": ("mlp", "out", ""),
    # Persimmon (fused q/k/v interleaved per head, as GPT-NeoX's)
    "self_attn.query_key_value": ("mha", "qkv", "interleaved"),
    # MPT (fused q/k/v role-major)
    "attn.Wqkv": ("mha", "qkv", "role_major"),
    "attn.out_proj": ("mha", "o", ""),
    "ffn.up_proj": ("mlp", "in", ""),
    "ffn.down_proj": ("mlp", "out", ""),
    # Phi (q/k/v as Llama's) and Phi-3 (fused role-major q/k/v with grouped-query heads, fused gate/up)
    "self_attn.dense": ("mha", "o", ""),
    "self_attn.qkv_proj": ("mha", "qkv", "role_major"),
    "mlp.gate_up_proj": ("mlp", "gate_up", ""),
    # Llama, Mistral, Qwen2 and friends
    "self_attn.q_proj": ("mha", "q", "separate"),
    "self_attn.k_proj": ("mha", "k", "separate"),
    "self_attn.v_proj": ("mha", "v", "separate"),
    "self_attn.o_proj": ("mha", "o", ""),
    "mlp.gate_proj": ("mlp", "gate", ""),
    "mlp.up_proj": ("mlp", "up", ""),
    "mlp.down_proj": ("mlp", "down", ""),
}


def _known(name: str) -> tuple[str, str, str] | None:
    """(kind, role, qkv layout) of a module whose name ends like a known projection, else None."""
    return next((v for k, v in _KNOWN.items() if name == k or name.endswith("." + k)), None)


def _in_layer_stack(name: str) -> bool:
    """Whether a module sits in a numbered stack of layers (``...layers.3.mlp...``), i.e. in the backbone."""
    return any(part.isdigit() for part in name.split("."))


def _layout_of(module: nn.Module) -> tuple[str, int, int]:
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        w = module.weight
        return "conv1d", int(w.shape[0]), int(w.shape[1])
    raise TypeError(f"module of type {type(module).__name__} is not a linear projection")


def _heads(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) from a transformers config."""
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if n_heads is None:
        raise ValueError(f"cannot find the number of attention heads in {type(config).__name__}")
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if getattr(config, "model_type", "") == "falcon":  # its own names for the key/value heads
        n_kv = config.num_kv_heads if config.new_decoder_architecture or not config.multi_query else 1
    if getattr(config, "model_type", "") == "gpt_bigcode":
        n_kv = 1 if config.multi_query else n_heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_size = getattr(config, "head_dim", None) or hidden // n_heads
    return int(n_heads), int(n_kv), int(head_size)


def _split(name: str, kind: str, role: str, layout: str, out_features: int, config,
           attention_blocks: str) -> tuple[Block, ...]:
    """The blocks of one module, labelled by (head, role) per the architecture's layout."""
    whole = (Block(name, name, kind, role, None, 0, out_features),)
    if kind != "mha" or role not in ("qkv", "q", "k", "v") or attention_blocks == "fused":
        return whole
    n_heads, n_kv, hs = _heads(config)
    blocks: list[Block] = []
    if layout == "interleaved":  # [h0: q k v | h1: q k v | ...]
        if out_features != 3 * n_heads * hs:
            raise ValueError(f"{name}: {out_features} outputs, expected 3 x {n_heads} heads x {hs}")
        for h in range(n_heads):
            for r, rn in enumerate("qkv"):
                s = (3 * h + r) * hs
                blocks.append(Block(f"{name}[h{h}.{rn}]", name, kind, rn, h, s, s + hs))
    elif layout == "grouped":  # Falcon: per key/value head g, [q of its n/n_kv query heads | k_g | v_g]
        group = n_heads // n_kv
        if out_features != (n_heads + 2 * n_kv) * hs:
            raise ValueError(f"{name}: {out_features} outputs, expected ({n_heads} + 2 x {n_kv}) heads x {hs}")
        for g in range(n_kv):
            base = g * (group + 2) * hs
            for i in range(group):
                s = base + i * hs
                blocks.append(Block(f"{name}[h{g * group + i}.q]", name, kind, "q", g * group + i, s, s + hs))
            for r, rn in ((group, "k"), (group + 1, "v")):
                s = base + r * hs
                blocks.append(Block(f"{name}[h{g}.{rn}]", name, kind, rn, g, s, s + hs))
    elif layout == "role_major":  # [q: h0 .. h(n-1) | k: h0 .. h(n_kv-1) | v: ...]
        if out_features != (n_heads + 2 * n_kv) * hs:
            raise ValueError(f"{name}: {out_features} outputs, expected ({n_heads} + 2 x {n_kv}) heads x {hs}")
        start = 0
        for rn in "qkv":
            for h in range(n_heads if rn == "q" else n_kv):
                blocks.append(Block(f"{name}[h{h}.{rn}]", name, kind, rn, h, start, start + hs))
                start += hs
    elif layout == "separate":
        n = n_heads if role == "q" else n_kv
        if out_features != n * hs:
            raise ValueError(f"{name}: {out_features} outputs, expected {n} heads x {hs}")
        for h in range(n):
            blocks.append(Block(f"{name}[h{h}.{role}]", name, kind, role, h, h * hs, (h + 1) * hs))
    else:
        return whole
    return tuple(blocks)


def discover_modules(model: nn.Module, attention_blocks: str = "per_head", modules: str = "all",
                     module_tags: dict[str, str] | None = None) -> list[ModuleSpec]:
    """Find the analysed linear projections of ``model`` and split them into blocks.

    Args:
        model: a transformers model (GPT-NeoX, BLOOM, GPT-2, Llama-style) or any ``nn.Module``.
        attention_blocks: ``"per_head"`` splits query/key/value into one block per (head, role);
            ``"fused"`` keeps each projection whole (what kronfluence does).
        modules: ``"all"`` (attention and MLP) or ``"mlp"`` (MLP projections only).
        module_tags: for other architectures, ``{module name: "mlp" | "mha"}``; each named module
            is analysed as one block. When given, automatic discovery is not used.
    """
    if attention_blocks not in ATTENTION_BLOCKS:
        raise ValueError(f"attention_blocks must be one of {ATTENTION_BLOCKS}, got {attention_blocks!r}")
    if modules not in MODULE_SETS:
        raise ValueError(f"modules must be one of {MODULE_SETS}, got {modules!r}")
    config = getattr(model, "config", None)
    named = dict(model.named_modules())
    specs: list[ModuleSpec] = []
    if module_tags:
        for name, tag in module_tags.items():
            if tag not in ("mlp", "mha"):
                raise ValueError(f"module {name!r} is tagged {tag!r}; tags must be 'mlp' or 'mha'")
            if name not in named:
                raise ValueError(f"module {name!r} is not in the model; check the names in module_tags")
            layout, d_in, d_out = _layout_of(named[name])
            if modules == "mlp" and tag != "mlp":
                continue
            specs.append(ModuleSpec(name, tag, layout, d_in, d_out, named[name].bias is not None,
                                    (Block(name, name, tag, tag, None, 0, d_out),)))
        return specs
    model_type = getattr(config, "model_type", "")
    for name, mod in named.items():
        match = _known(name)
        if match is None:
            continue
        kind, role, qkv_layout = match
        if (qkv_layout, model_type) in (("interleaved", "falcon"), ("role_major", "gpt_bigcode")):
            qkv_layout = "grouped"  # named like BLOOM's / GPT-2's, laid out per key/value group
        if modules == "mlp" and kind != "mlp":
            continue
        layout, d_in, d_out = _layout_of(mod)
        blocks = _split(name, kind, role, qkv_layout, d_out, config, attention_blocks)
        specs.append(ModuleSpec(name, kind, layout, d_in, d_out, mod.bias is not None, blocks))
    if not specs:
        raise ValueError(
            f"no analysable modules found in {type(model).__name__}; pass module_tags={{name: 'mlp'|'mha'}}")
    _warn_unknown_projections(model, named)
    return specs


def _warn_unknown_projections(model: nn.Module, named: dict[str, nn.Module]) -> None:
    """Log the linear projections of the layer stack that discovery did not recognise (a partly known
    architecture would otherwise be analysed without them)."""
    missed = [n for n, m in named.items()
              if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and _in_layer_stack(n)
              and _known(n) is None]
    if missed:
        log.warning("%d linear projections of %s are not analysed, e.g. %s; name every module to analyse in "
                    "module_tags={name: 'mlp'|'mha'} to include them", len(missed), type(model).__name__,
                    ", ".join(missed[:3]))


def discover_blocks(model: nn.Module, attention_blocks: str = "per_head", modules: str = "all",
                    module_tags: dict[str, str] | None = None) -> list[Block]:
    """All blocks of ``discover_modules``, flattened."""
    return [b for m in discover_modules(model, attention_blocks, modules, module_tags) for b in m.blocks]


def block_matrix(model: nn.Module, spec: ModuleSpec, block: Block | None = None,
                 grad: bool = False) -> torch.Tensor:
    """The [p, d] matrix (weight rows, bias as last column) of a block or whole module.

    With ``grad=True`` the same view of the parameters' ``.grad``. Handles GPT-2's transposed
    ``Conv1D`` weight, so every block is seen in the same (output x input) orientation.
    """
    mod = model.get_submodule(spec.name)
    w = mod.weight.grad if grad else mod.weight
    w = w.t() if spec.layout == "conv1d" else w
    lo, hi = (0, spec.out_features) if block is None else (block.row_start, block.row_stop)
    m = w[lo:hi]
    if spec.has_bias:
        b = mod.bias.grad if grad else mod.bias
        m = torch.cat([m, b[lo:hi, None]], dim=1)
    return m


def check_compatible(pt_specs: list[ModuleSpec], ft_specs: list[ModuleSpec]) -> list[str]:
    """Names of modules present in both models; raise naming the first shape mismatch, or the first
    backbone-layer module found in one model only (a different number of layers). Other modules found
    in one model only (outside the numbered layer stack: SPEC's "blocks present in only one model") are
    left out."""
    ft = {s.name: s for s in ft_specs}
    pt_names = {s.name for s in pt_specs}
    for which, specs, other in (("pre-trained", pt_specs, ft), ("fine-tuned", ft_specs, pt_names)):
        lone = [s.name for s in specs if s.name not in other and _in_layer_stack(s.name)]
        if lone and len(lone) < len(specs):
            raise ValueError(
                f"module {lone[0]} is in the {which} model only ({len(lone)} such layer modules): the "
                f"backbones differ (another number of layers?); both checkpoints must share the backbone "
                f"architecture")
    common = []
    for s in pt_specs:
        if s.name in ft:
            if s.shape_key() != ft[s.name].shape_key():
                raise ValueError(
                    f"module {s.name} differs between the pre-trained and fine-tuned models: "
                    f"{s.shape_key()} vs {ft[s.name].shape_key()} (layout, in, out, bias, blocks); "
                    f"both checkpoints must share the backbone architecture")
            common.append(s.name)
    if not common:
        raise ValueError("the pre-trained and fine-tuned models share no analysed module names")
    return common


FINGERPRINT_VERSION = 2  # 1 hashed the analysed weights only


def fingerprint(model: nn.Module, specs: list[ModuleSpec]) -> str:
    """A content hash of the model's parameters and the analysed block layout.

    Every parameter counts, not only the analysed blocks': factors depend on the embeddings, norms and
    head too (through the activations ``a`` and the loss gradients ``ds``), so factors fitted before any
    weight changed are refused.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"version": FINGERPRINT_VERSION, "class": type(model).__name__,
                         "blocks": [s.to_json() for s in specs]}, sort_keys=True).encode())
    for name, t in model.named_parameters():
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy())  # float32: the same for any load dtype
    return "sha256:" + h.hexdigest()
