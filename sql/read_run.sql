-- The runs whose id starts with the given text (a whole id or a prefix), newest first.
SELECT * FROM @table WHERE starts_with(run_id, ?) ORDER BY started_at DESC LIMIT 2
