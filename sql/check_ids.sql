-- Null ids, and one id that repeats (by DuckDB's equality, the one the merge uses), of a registered batch.
SELECT
    (SELECT count(*) FROM @ids WHERE id IS NULL),
    (SELECT id FROM @ids WHERE id IS NOT NULL GROUP BY id HAVING count(*) > 1 LIMIT 1)
