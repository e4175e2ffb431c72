-- A few rows of a table.
SELECT * FROM @table LIMIT ?
