-- Top k documents per query and method, across all shards (rank 1 = most supporting).
-- A positive score means upweighting the document lowers the loss of the query's completion.
-- Usage: duckdb <root>/msif.duckdb < msif_assets/sql/top_k_per_query.sql        (edit k below)
-- Only rows with shard_rank <= k can be in a global top k, so the pre-filter keeps this fast.
SET VARIABLE k = 10;

WITH ranked AS (
    SELECT s.*,
           row_number() OVER (PARTITION BY query_id, method ORDER BY (CASE WHEN isnan(score) THEN NULL ELSE score END) DESC NULLS LAST, doc_id) AS rank
    FROM influence_scores_by_shard s
    WHERE shard_rank <= getvariable('k')
)
SELECT r.query_id, r.method, r.rank, r.doc_id, r.score, r.mlp_score, r.mha_score,
       list_contains(q.true_doc_ids, r.doc_id) AS is_true_source,
       d.text
FROM ranked r
JOIN documents d USING (doc_id)
LEFT JOIN queries q USING (query_id)
WHERE r.rank <= getvariable('k')
ORDER BY r.query_id, r.method, r.rank;
