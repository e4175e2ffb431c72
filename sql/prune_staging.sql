-- Drop staged rows of an interrupted run whose prompt no longer matches the current rows.
DELETE FROM @staging AS s
WHERE NOT EXISTS (
    SELECT 1 FROM @keys AS k
    WHERE k.id = s.id AND k.prompt_hash IS NOT DISTINCT FROM s.prompt_hash
)
