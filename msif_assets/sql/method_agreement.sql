-- Agreement between methods: for every pair of methods, the mean overlap of their top-k documents
-- per query (|A ∩ B| / k) and the share of queries whose top-1 document is the same.
-- Usage: duckdb <root>/msif.duckdb < msif_assets/sql/method_agreement.sql
SET VARIABLE k = 10;

WITH ranked AS (
    SELECT query_id, method, doc_id,
           row_number() OVER (PARTITION BY query_id, method ORDER BY (CASE WHEN isnan(score) THEN NULL ELSE score END) DESC NULLS LAST, doc_id) AS rank
    FROM influence_scores_by_shard
    WHERE shard_rank <= getvariable('k')
),
top AS (SELECT * FROM ranked WHERE rank <= getvariable('k')),
pairs AS (
    SELECT a.method AS method_a, b.method AS method_b, a.query_id,
           count(*) FILTER (WHERE a.doc_id = b.doc_id)                        AS shared,
           max(CASE WHEN a.rank = 1 AND b.rank = 1 AND a.doc_id = b.doc_id THEN 1 ELSE 0 END) AS same_top1
    FROM top a JOIN top b ON a.query_id = b.query_id AND a.method < b.method
    GROUP BY a.method, b.method, a.query_id
)
SELECT method_a, method_b,
       count(*)                                   AS queries,
       avg(shared) / getvariable('k')             AS mean_top_k_overlap,
       avg(same_top1)                             AS same_top1_share
FROM pairs
GROUP BY method_a, method_b
ORDER BY mean_top_k_overlap DESC, method_a, method_b;
