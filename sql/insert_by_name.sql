-- Append a registered Arrow batch to a table, matching columns by name.
INSERT INTO @table BY NAME SELECT * FROM @batch
