"""Pre-train EK-FAC as a map-reduce over the fit shards (SPEC section 3)::

    corpus_shards[f], pretrained_checkpoint → pretrain_covariance_sums[f] → pretrain_eigenbasis
        → pretrain_lambda_sums[f] → pretrain_factors

Present when a configured method preconditions with P_pt (MS-IF).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg

from ..io import CorruptTableError, shard_index
from ..sources import FIT_PARTITIONS
from .base import FACTOR_SETTINGS, Dep, Step, Timer, asset, factor_metadata, fingerprint_version, fix
from .corpus import read_documents

FIT = ("shard_size", *FACTOR_SETTINGS)


def _needed(cfg) -> bool:
    return cfg.needs_pretrain_factors


def fit_settings(step: Step, shard: int):
    """The EK-FAC fit settings of fit shard ``shard`` (its seed mixes in the shard index)."""
    from msif_core.ekfac import FitSettings

    f = step.cfg.factors
    return FitSettings(fisher=f.fisher, max_examples=f.max_examples, batch_size=f.batch_size,
                       seed=step.settings.seed, shard=shard)


def fit_documents(step: Step, key: str, pt) -> tuple[Any, int]:
    """The encoded documents of fit shard ``key`` within ``max_examples``, and its index."""
    from msif_core.data import encode_documents

    cfg = step.cfg
    i = shard_index(key)
    df = read_documents(step, key)
    limit = max(0, min(len(df), cfg.factors.max_examples - i * cfg.shard_size))
    enc = encode_documents(pt.loaded.tokenizer, df.text.tolist()[:limit], cfg.factors.max_length)
    if len(enc) == 0:
        raise dg.Failure(f"pre-train fit shard {key}: no document with at least 2 tokens")
    return enc, i


def fit_keys(step: Step) -> list[str]:
    """The registered fit shards."""
    keys = sorted(step.context.instance.get_dynamic_partitions(FIT_PARTITIONS.name))
    if not keys:
        raise dg.Failure("no pre-train fit shards are registered; run `msif run` or the source sensor")
    return keys


def load_parts(paths: list[Path], loader: Callable, what: str, asset_name: str, keys: list[str]) -> list:
    """Every fit shard's partial sums, or an error naming the missing or unreadable file and the fix."""
    parts = []
    for p, key in zip(paths, keys):
        if not p.exists():
            raise CorruptTableError(f"{what} of {key} is missing ({p}). Fix: {fix(asset_name, key)}")
        try:
            parts.append(loader(p))
        except Exception as e:  # noqa: BLE001 - any unreadable partial file gets the same advice
            raise CorruptTableError(f"{what} of {key}: {p} is unreadable ({e}). Fix: {fix(asset_name, key)}") from e
    return parts


@asset("pretrain_covariance_sums", "pretrain_factors",
       "Map step 1: EK-FAC covariance sums (A, S) of θ_pt over one fit shard.",
       deps=[Dep("corpus_shards", identity=True), "pretrained_checkpoint"], settings=FIT, partitions=FIT_PARTITIONS,
       kinds=["pytorch", "safetensors"], heavy=True, resources=["lakehouse", "device"], when=_needed,
       outputs=lambda lay, k, _: [lay.covariance_sums(k)])
def pretrain_covariance_sums(step: Step) -> dg.MaterializeResult:
    """Covariance sums of one fit shard."""
    from msif_core.ekfac import covariance_sums

    key = step.key
    pt, _ = step.stages()
    enc, i = fit_documents(step, key, pt)
    t = Timer()
    sums = covariance_sums(pt.model, pt.specs, enc, fit_settings(step, i), pt.pad_id)
    sums.save(step.layout.covariance_sums(key))
    secs = t.seconds
    return dg.MaterializeResult(metadata={
        "sequences": sums.sequences, "tokens": sums.tokens, "seconds": round(secs, 3),
        "truncated_documents": enc.n_truncated, "tokens_per_second": round(sums.tokens / max(secs, 1e-9), 1),
        "modules": len(sums.a), "path": dg.MetadataValue.path(str(step.layout.covariance_sums(key)))})


@asset("pretrain_eigenbasis", "pretrain_factors",
       "Reduce step 1: merged covariances → eigenvectors Q_A, Q_S (float64 eigh).",
       deps=["pretrain_covariance_sums"], settings=FIT, kinds=["pytorch", "safetensors"], heavy=True, when=_needed,
       outputs=lambda lay, k, _: [lay.eigenbasis])
def pretrain_eigenbasis(step: Step) -> dg.MaterializeResult:
    """The eigenbasis of the merged covariances."""
    from msif_core.ekfac import CovarianceSums, eigenbasis, merge_all

    keys = fit_keys(step)
    t = Timer()
    parts = load_parts([step.layout.covariance_sums(k) for k in keys], CovarianceSums.load, "covariance sums",
                       "pretrain_covariance_sums", keys)
    sums = merge_all(parts)
    basis = eigenbasis(sums)
    basis.save(step.layout.eigenbasis)
    return dg.MaterializeResult(metadata={
        "fit_shards": ", ".join(keys), "tokens": sums.tokens, "sequences": sums.sequences,
        "modules": len(basis.q_a), "seconds": round(t.seconds, 3),
        "path": dg.MetadataValue.path(str(step.layout.eigenbasis))})


@asset("pretrain_lambda_sums", "pretrain_factors",
       "Map step 2: sums of squared rotated per-sequence gradients (Λ) over one fit shard.",
       deps=[Dep("corpus_shards", identity=True), "pretrain_eigenbasis", "pretrained_checkpoint"], settings=FIT,
       partitions=FIT_PARTITIONS, kinds=["pytorch", "safetensors"], heavy=True, resources=["lakehouse", "device"],
       when=_needed, outputs=lambda lay, k, _: [lay.lambda_sums(k)])
def pretrain_lambda_sums(step: Step) -> dg.MaterializeResult:
    """Λ sums of one fit shard in the merged eigenbasis."""
    from msif_core.ekfac import Eigenbasis, lambda_sums

    key, layout = step.key, step.layout
    pt, _ = step.stages()
    enc, i = fit_documents(step, key, pt)
    if not layout.eigenbasis.exists():
        raise CorruptTableError(f"{layout.eigenbasis} is missing. Fix: {fix('pretrain_eigenbasis')}")
    basis = Eigenbasis.load(layout.eigenbasis)
    t = Timer()
    lam = lambda_sums(pt.model, pt.specs, enc, basis, fit_settings(step, i), pt.pad_id)
    lam.save(layout.lambda_sums(key))
    secs = t.seconds
    return dg.MaterializeResult(metadata={
        "sequences": lam.sequences, "tokens": enc.n_tokens, "seconds": round(secs, 3),
        "tokens_per_second": round(enc.n_tokens / max(secs, 1e-9), 1),
        "path": dg.MetadataValue.path(str(layout.lambda_sums(key)))})


@asset("pretrain_factors", "pretrain_factors", "Reduce step 2: EK-FAC factors of θ_pt (Q_A, Q_S, Λ) on the fit shards.",
       deps=["pretrain_lambda_sums", "pretrain_eigenbasis", "pretrained_checkpoint"], settings=FIT,
       version_extra=fingerprint_version, kinds=["pytorch", "safetensors"], heavy=True,
       resources=["lakehouse", "device"], when=_needed, outputs=lambda lay, k, _: [lay.pretrain_factors])
def pretrain_factors(step: Step) -> dg.MaterializeResult:
    """The pre-train factors: the eigenbasis and the merged Λ."""
    from msif_core.ekfac import Eigenbasis, LambdaSums, finalize, merge_all

    keys, layout = fit_keys(step), step.layout
    pt, _ = step.stages()
    t = Timer()
    parts = load_parts([layout.lambda_sums(k) for k in keys], LambdaSums.load, "Λ sums", "pretrain_lambda_sums", keys)
    basis = Eigenbasis.load(layout.eigenbasis)
    factors = finalize(pt.model, pt.specs, basis, merge_all(parts), fit_settings(step, 0),
                       {"stage": "pretrain", "fit_shards": keys, "checkpoint": str(step.cfg.pretrained),
                        "checkpoint_version": step.model_versions()[0]})
    factors.save(layout.pretrain_factors)
    return dg.MaterializeResult(metadata=factor_metadata(factors, t.seconds, layout.pretrain_factors))


NODES = (pretrain_covariance_sums, pretrain_eigenbasis, pretrain_lambda_sums, pretrain_factors)
