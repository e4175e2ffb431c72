-- Column names and types of the job's query, without reading its rows.
SELECT * FROM (@query) AS q LIMIT 0
