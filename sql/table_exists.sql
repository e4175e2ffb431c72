-- 1 when a table exists in the current database: bind (schema, name); DuckDB names ignore case.
SELECT count(*) FROM duckdb_tables()
WHERE database_name = current_database() AND lower(schema_name) = lower(?) AND lower(table_name) = lower(?)
