-- Add the columns of @like that @table lacks, NULL in its rows (a table from an older version).
CREATE OR REPLACE TABLE @table AS
SELECT * FROM @table
UNION ALL BY NAME
SELECT * FROM @like WHERE false
