SELECT count(*) FROM @table
