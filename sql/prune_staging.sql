-- Drop staged rows of an interrupted run whose prompt no longer matches the current row of that id;
-- in replace mode (@whole_run true) also those of ids this run does not read. In merge mode those stay
-- (a smaller limits.max_rows, a narrower query): the load merges them, as the interrupted run would have.
DELETE FROM @staging AS s
WHERE EXISTS (
    SELECT 1 FROM @keys AS k
    WHERE k.id = s.id AND k.prompt_hash IS DISTINCT FROM s.prompt_hash
) OR (@whole_run AND NOT EXISTS (SELECT 1 FROM @keys AS k WHERE k.id = s.id))
