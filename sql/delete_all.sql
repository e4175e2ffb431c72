-- Empty a table (replace mode with no rows to write).
DELETE FROM @table
