-- A few rows of a table, in a stable order (a results table's first column is its id).
SELECT * FROM @table ORDER BY ALL LIMIT ?
