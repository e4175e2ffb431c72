-- An empty table with the columns of a registered Arrow batch (or another table).
CREATE TABLE IF NOT EXISTS @table AS SELECT * FROM @like WHERE false
