-- How much of each gradient method's score comes from MLP blocks vs attention (MHA) blocks,
-- over each query's top k documents. mlp_share_abs = |mlp| / (|mlp| + |mha|), averaged.
-- Usage: duckdb <root>/msif.duckdb < msif_assets/sql/mlp_vs_attention.sql
SET VARIABLE k = 10;

WITH ranked AS (
    SELECT s.*,
           row_number() OVER (PARTITION BY query_id, method ORDER BY (CASE WHEN isnan(score) THEN NULL ELSE score END) DESC NULLS LAST, doc_id) AS rank
    FROM influence_scores_by_shard s
    WHERE shard_rank <= getvariable('k') AND mlp_score IS NOT NULL AND NOT isnan(mlp_score)
)
SELECT method,
       count(*)                                                              AS rows,
       avg(score)                                                            AS mean_score,
       avg(mlp_score)                                                        AS mean_mlp_score,
       avg(mha_score)                                                        AS mean_mha_score,
       avg(abs(mlp_score) / nullif(abs(mlp_score) + abs(mha_score), 0))      AS mlp_share_abs,
       avg(CASE WHEN sign(mlp_score) = sign(score) THEN 1.0 ELSE 0.0 END)    AS mlp_agrees_in_sign
FROM ranked
WHERE rank <= getvariable('k')
GROUP BY method
ORDER BY method;
