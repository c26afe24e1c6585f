-- Fact-tracing quality where queries carry true_doc_ids (SPEC section 6), per method:
--   MRR       = mean over queries of 1 / rank of the first true source (0 beyond rank `cutoff`);
--   Recall@k  = mean over queries of |true sources in the top k| / |true sources|.
-- Ranks are across all shards, among each query's scored candidates (rank 1 = most supporting).
-- Usage: duckdb <root>/msif.duckdb < msif_assets/sql/quality.sql
SET VARIABLE cutoff = 100;
SET VARIABLE k = 10;

WITH ranked AS (
    SELECT query_id, doc_id, method,
           row_number() OVER (PARTITION BY query_id, method ORDER BY (CASE WHEN isnan(score) THEN NULL ELSE score END) DESC NULLS LAST, doc_id) AS rank
    FROM influence_scores_by_shard
    WHERE shard_rank <= greatest(getvariable('cutoff'), getvariable('k'))
),
truth AS (
    SELECT DISTINCT query_id, unnest(true_doc_ids) AS doc_id
    FROM queries
    WHERE scored AND true_doc_ids IS NOT NULL AND len(true_doc_ids) > 0
),
n_true AS (SELECT query_id, count(*) AS n_true FROM truth GROUP BY query_id),
methods AS (SELECT DISTINCT method FROM influence_scores_by_shard),
per_query AS (
    SELECT m.method, n.query_id, any_value(n.n_true) AS n_true,
           min(r.rank)                                       AS first_true_rank,
           count(r.rank) FILTER (WHERE r.rank <= getvariable('k')) AS true_in_top_k
    FROM n_true n
    CROSS JOIN methods m
    JOIN truth t ON t.query_id = n.query_id
    LEFT JOIN ranked r ON r.query_id = t.query_id AND r.doc_id = t.doc_id AND r.method = m.method
    GROUP BY m.method, n.query_id
)
SELECT method,
       count(*)                                                                    AS n_queries,
       avg(CASE WHEN first_true_rank <= getvariable('cutoff') THEN 1.0 / first_true_rank ELSE 0 END) AS mrr,
       avg(true_in_top_k / n_true)                                                 AS recall_at_k,
       median(first_true_rank)                                                     AS median_first_true_rank
FROM per_query
GROUP BY method
ORDER BY mrr DESC, method;
