-- (id, prompt_hash) of rows that already have an ok result for this model and params.
SELECT id, prompt_hash FROM @table
WHERE status = 'ok' AND model = ? AND params_hash = ?
