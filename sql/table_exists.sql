-- 1 when a table exists in the current database: bind (schema, name).
SELECT count(*) FROM duckdb_tables()
WHERE database_name = current_database() AND schema_name = ? AND table_name = ?
