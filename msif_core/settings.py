"""Every setting of an attribution, defined once: its name, type, default, allowed values and help.

- :class:`FactorSettings` — how the EK-FAC factors of both stages are fitted (``[factors]`` of an
  experiment file);
- :class:`ScoreSettings` — which methods score, with which damping and query rank (``[scores]``);
- :class:`IndexSettings` — the pre-training influence index (``[index]``, :mod:`msif_core.index`).

The experiment file is validated from these fields (``msif_assets.config``), the API's
:class:`msif_core.api.AttributionSettings` is made of them, and the pipeline's code versions hash them by
their ``section.name``. A field's ``metadata`` carries ``help`` and, where they apply, ``choices`` and
``minimum``; :func:`describe` lists them.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .methods import DEFAULT_METHODS, needs_finetune_factors, needs_pretrain_factors


def setting(default: Any, help: str, choices: tuple | None = None, minimum: int | None = None) -> Any:
    """A dataclass field with its help text (and allowed values or lower bound)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if minimum is not None:
        meta["minimum"] = minimum
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FactorSettings:
    """``[factors]``: how the EK-FAC factors of both stages are fitted."""

    fisher: str = setting("true", "'true' samples targets from the model; 'empirical' uses the data's tokens",
                          choices=("true", "empirical"))
    attention_blocks: str = setting("per_head", "'per_head' (one block per head and role) or 'fused'",
                                    choices=("per_head", "fused"))
    modules: str = setting("all", "'all' or 'mlp' (MLP projections only)", choices=("all", "mlp"))
    max_examples: int = setting(100_000, "cap on sequences per factor fit", minimum=1)
    max_length: int = setting(512, "tokens per sequence; longer ones are truncated", minimum=2)
    batch_size: int = setting(8, "sequences per forward/backward pass", minimum=1)
    module_tags: tuple[tuple[str, str], ...] = setting(
        (), "for architectures msif does not know: (module name, 'mlp' | 'mha') pairs, each module one block; "
            "replaces the automatic discovery")


@dataclass(frozen=True)
class ScoreSettings:
    """``[scores]``: which methods score, with which damping and query rank."""

    methods: tuple[str, ...] = setting(DEFAULT_METHODS, "methods to score with (see msif_core.methods)")
    damping_pretrain: float | str = setting(1e-4, "λ of P_pt: a number, or 'relative:c' (c x mean eigenvalue)")
    damping_finetune: float | str = setting(1e-4, "λ of P_ft: a number, or 'relative:c' (c x mean eigenvalue)")
    query_rank: int = setting(0, "0 exact; r > 0 keeps rank-r query iHVPs of each module's whole matrix", minimum=0)
    memory_gib: float | None = setting(None, "memory budget of the whole attribution process (GiB, models "
                                             "included), from which the query chunks and the document batch "
                                             "follow (msif_core.plan); default: half the memory available")

    @property
    def gradient_methods(self) -> tuple[str, ...]:
        """The methods that need query iHVPs, in the configured order."""
        from .methods import METHODS

        return tuple(m for m in self.methods if METHODS[m].gradient)

    @property
    def needs_finetune_factors(self) -> bool:
        """Whether a configured method preconditions with the fine-tuned model's EK-FAC."""
        return needs_finetune_factors(self.methods)

    @property
    def needs_pretrain_factors(self) -> bool:
        """Whether a configured method preconditions with the pre-trained model's EK-FAC."""
        return needs_pretrain_factors(self.methods)


@dataclass(frozen=True)
class IndexSettings:
    """``[index]``: the pre-training influence index (:mod:`msif_core.index`): MS-IF's document side built
    once per pre-trained model, so a new fine-tune or new queries need no pass over the corpus."""

    dimensions: int = setting(0, "numbers per index vector (a seeded random projection of the whitened "
                                 "gradients); 0: no index", minimum=0)
    whiten: bool = setting(True, "split P_pt between both sides, (Λ+λ)^(-1/2) each (true), or keep all of "
                                 "it on the query side (false; the index then does not depend on λ_pt)")
    seed: int = setting(0, "seed of the random projection (documents and queries share it)", minimum=0)
    cosine: bool = setting(True, "rank ms_if_index by ⟨ψ, φ⟩ / ‖φ‖ (each document's vector to unit length; "
                                 "ranks better than the plain product at every k measured) instead of ⟨ψ, φ⟩ "
                                 "(gdp_index is always the plain product)")
    dtype: str = setting("float16", "how the index stores its vectors: float16 (each row scaled to unit length, "
                                    "its norm kept in float32: half the bytes of float32, the same ranking as "
                                    "measured), or float32",
                         choices=("float32", "float16"))
    gdp: bool = setting(False, "also rank by the gradient dot product from the same index (method gdp_index: "
                               "query vectors Π W⁻¹ ∇m; no fine-tune factors, no second pass over the corpus)")
    keep: int = setting(100, "documents per query and shard kept as method ms_if_index (and gdp_index)",
                        minimum=1)
    rerank: int = setting(100, 'with [scores] candidates = "index": the documents per query and shard, by index '
                               "score, that the exact methods score", minimum=1)

    @property
    def enabled(self) -> bool:
        """Whether an index is built."""
        return self.dimensions > 0

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods scored from the index: ms_if_index, and gdp_index with ``gdp`` (none without an index)."""
        return (("ms_if_index",) + (("gdp_index",) if self.gdp else ())) if self.enabled else ()


def default_of(cls: type, name: str) -> Any:
    """The default of setting ``name`` of ``cls``."""
    for f in fields(cls):
        if f.name == name:
            return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) of every setting of ``cls``, in order."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(cls)]
