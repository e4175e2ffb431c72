-- Column names and types of the job's query, without reading its rows (the query on its own lines,
-- as in extract.sql).
SELECT * FROM (
@query
) AS q LIMIT 0
