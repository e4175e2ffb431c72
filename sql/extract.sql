-- The job's rows; LIMIT NULL means no limit (limits.max_rows). The query stands on its own lines: a
-- trailing -- comment in it ends there.
SELECT * FROM (
@query
) AS q LIMIT ?
