-- Distinct ids of a staging table: the rows a load writes (a retried shard may stage an id twice).
SELECT count(DISTINCT id) FROM @table
