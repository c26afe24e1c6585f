"""Asset checks: finite factors, Λ ≥ 0, finite scores, every query has its rows (and no duplicates), and
every asset partition's files are those its latest materialisation recorded (``outputs_intact``).

The check logic is in plain functions (``factors_problems``, ``score_problems``) that return a list of
problems, so it can be tested on bad files directly; the Dagster checks wrap them.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import torch

from .config import ExperimentConfig
from .layout import Layout
from .views import connect


def factors_problems(directory: Path) -> dict[str, list[str]]:
    """``{"finite": [...], "nonnegative": [...]}``: modules with non-finite tensors / negative Λ."""
    from msif_core.ekfac import Factors

    f = Factors.load(directory)
    finite, nonneg = [], []
    for name in f.specs:
        for what, t in (("Q_A", f.q_a[name]), ("Q_S", f.q_s[name]), ("Λ", f.lam[name])):
            n = int((~torch.isfinite(t)).sum())
            if n:
                finite.append(f"{name} {what}: {n} non-finite values")
        neg = int((f.lam[name] < 0).sum())
        if neg:
            nonneg.append(f"{name}: {neg} negative Λ values (min {float(f.lam[name].min()):.3g})")
    return {"finite": finite, "nonnegative": nonneg}


def score_problems(layout: Layout) -> dict[str, list[str]]:
    """``{"finite": [...], "rows": [...], "duplicates": [...]}`` over all influence_scores partitions (the
    rows of every method but ``ms_if_index`` and ``gdp_index``, which keep their own top documents, follow the
    candidates)."""
    con = connect(layout)
    from msif_core.methods import INDEX_METHODS

    # the index keeps its own top [index] keep, not the candidates
    cand = "method NOT IN (" + ", ".join(f"'{m}'" for m in INDEX_METHODS) + ")"
    try:
        nonfinite = con.execute(
            "SELECT method, count(*) FROM influence_scores_by_shard WHERE score IS NULL OR NOT isfinite(score) "
            "GROUP BY method ORDER BY method").fetchall()
        methods = [r[0] for r in con.execute(f"SELECT DISTINCT method FROM influence_scores_by_shard WHERE {cand}")
                   .fetchall()]
        missing = con.execute(
            "WITH m AS (SELECT DISTINCT method FROM influence_scores_by_shard), "
            "q AS (SELECT query_id FROM queries WHERE scored), "
            "c AS (SELECT query_id, method, count(*) AS n FROM influence_scores_by_shard GROUP BY ALL) "
            "SELECT q.query_id, m.method FROM q CROSS JOIN m LEFT JOIN c USING (query_id, method) "
            "WHERE c.n IS NULL ORDER BY 1, 2 LIMIT 20").fetchall()
        uneven = con.execute(
            f"WITH c AS (SELECT query_id, method, count(*) AS n FROM influence_scores_by_shard WHERE {cand} "
            "GROUP BY ALL) "
            "SELECT query_id, min(n), max(n) FROM c GROUP BY query_id HAVING min(n) <> max(n) "
            f"OR count(*) <> {len(methods)} ORDER BY 1 LIMIT 20").fetchall()
        expected = con.execute(
            "WITH d AS (SELECT DISTINCT doc_id FROM influence_scores_by_shard) "
            "SELECT count(*) FROM candidates c JOIN d USING (doc_id) "
            "WHERE c.query_id IN (SELECT query_id FROM queries WHERE scored)").fetchone()[0]
        per_method = con.execute(f"SELECT method, count(*) FROM influence_scores_by_shard WHERE {cand} "
                                 "GROUP BY method").fetchall()
        dups = con.execute(
            "SELECT query_id, doc_id, method, count(*) FROM influence_scores_by_shard GROUP BY ALL "
            "HAVING count(*) > 1 LIMIT 10").fetchall()
    finally:
        con.close()
    rows = [f"query {q} has no {m} rows" for q, m in missing]
    rows += [f"query {q}: methods have {lo}..{hi} rows (or a method is missing)" for q, lo, hi in uneven]
    rows += [f"{m}: {n} rows, candidates call for {expected}" for m, n in per_method if n != expected]
    return {"finite": [f"{m}: {n} non-finite scores" for m, n in nonfinite], "rows": rows,
            "duplicates": [f"({q}, {d}, {m}) appears {n} times" for q, d, m, n in dups]}


def _result(problems: list[str], ok: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
                               description=ok if not problems else "; ".join(problems[:10]),
                               metadata={"problems": len(problems)})


def build_checks(cfg: ExperimentConfig, asset_names: set[str]) -> list[dg.AssetChecksDefinition]:
    """Checks for the assets present in the graph."""
    layout = Layout(cfg.root)
    checks: list[dg.AssetChecksDefinition] = []
    for name, path in (("pretrain_factors", layout.pretrain_factors), ("finetune_factors", layout.finetune_factors)):
        if name not in asset_names:
            continue

        def make(name: str, path: Path) -> list[dg.AssetChecksDefinition]:
            @dg.asset_check(asset=name, name="factors_finite", blocking=True,
                            description="Q_A, Q_S and Λ hold only finite numbers.")
            def factors_finite() -> dg.AssetCheckResult:
                return _result(factors_problems(path)["finite"], "all factors finite")

            @dg.asset_check(asset=name, name="lambda_nonnegative", blocking=True,
                            description="Λ (EK-FAC eigenvalues, squared rotated gradients) is never negative.")
            def lambda_nonnegative() -> dg.AssetCheckResult:
                return _result(factors_problems(path)["nonnegative"], "Λ ≥ 0 everywhere")

            return [factors_finite, lambda_nonnegative]

        checks += make(name, path)

    @dg.asset_check(asset="score_tables", name="scores_finite", description="Every score is a finite number.")
    def scores_finite() -> dg.AssetCheckResult:
        return _result(score_problems(layout)["finite"], "all scores finite")

    @dg.asset_check(asset="score_tables", name="every_query_has_its_rows",
                    description="Every scored query has one row per candidate document for every method.")
    def every_query_has_its_rows() -> dg.AssetCheckResult:
        return _result(score_problems(layout)["rows"], "every query has its rows")

    @dg.asset_check(asset="score_tables", name="no_duplicate_rows",
                    description="(query_id, doc_id, method) is unique across all shards.")
    def no_duplicate_rows() -> dg.AssetCheckResult:
        return _result(score_problems(layout)["duplicates"], "no duplicates")

    @dg.asset_check(asset="score_tables", name="outputs_intact",
                    description="Every asset partition's files are those its latest materialisation wrote "
                                "(none deleted or altered since); `msif run` recomputes any that are not.")
    def outputs_intact(context) -> dg.AssetCheckResult:  # unannotated: the string annotation is refused
        stale = outputs_problems(context.instance, cfg, asset_names)
        return _result([f"{k.to_user_string()}{f'[{p}]' if p else ''}: {why}" for (k, p), why in stale.items()],
                       "every output is as written")

    return checks + [scores_finite, every_query_has_its_rows, no_duplicate_rows, outputs_intact]


def outputs_problems(instance: dg.DagsterInstance, cfg: ExperimentConfig, asset_names: set[str]) -> dict:
    """(asset key, partition) → why, for every materialised asset partition whose files changed."""
    from .outputs import lakehouse_problems

    return lakehouse_problems(instance, cfg, asset_names)
