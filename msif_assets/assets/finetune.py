"""Fine-tune EK-FAC: the factors of θ_ft on its own fine-tuning data, completion tokens only
(``finetuned_checkpoint, finetuning_data → finetune_factors``). Present when a configured method
preconditions with P_ft (MS-IF, SS-IF)."""

from __future__ import annotations

import dagster as dg

from ..io import read_records
from .base import FACTOR_SETTINGS, Step, Timer, asset, factor_metadata, fingerprint_version


@asset("finetune_factors", "finetune_factors", "EK-FAC factors of θ_ft on the fine-tuning data (completion tokens "
       "only).", deps=["finetuned_checkpoint", "finetuning_data"], settings=FACTOR_SETTINGS,
       version_extra=fingerprint_version, kinds=["pytorch", "safetensors"], heavy=True,
       resources=["lakehouse", "device"], when=lambda cfg: cfg.needs_finetune_factors,
       outputs=lambda lay, k, _: [lay.finetune_factors])
def finetune_factors(step: Step) -> dg.MaterializeResult:
    """Fit θ_ft's EK-FAC on the fine-tuning pairs."""
    from msif_core.api import encode_queries, fit_stage_factors

    cfg, layout = step.cfg, step.layout
    _, ft = step.stages()
    data = read_records(cfg.finetuning_data, "fine-tuning data", ("prompt", "completion"))
    enc = encode_queries(ft, data.prompt.astype(str).tolist(), data.completion.tolist(), cfg.factors.max_length)
    t = Timer()
    factors = fit_stage_factors(ft, enc, step.settings)
    factors.manifest.update({"stage": "finetune", "checkpoint": str(cfg.finetuned),
                             "checkpoint_version": step.model_versions()[1]})
    factors.save(layout.finetune_factors)
    md = factor_metadata(factors, t.seconds, layout.finetune_factors)
    md["tokens_per_second"] = round(2 * enc.n_tokens / max(t.seconds, 1e-9), 1)  # two passes
    return dg.MaterializeResult(metadata=md)


NODES = (finetune_factors,)
