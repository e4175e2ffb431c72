-- The job's rows; LIMIT NULL means no limit (limits.max_rows).
SELECT * FROM (@query) AS q LIMIT ?
