-- Column names of a table or registered batch (read from the result's description).
SELECT * FROM @table LIMIT 0
