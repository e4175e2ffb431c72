-- 1 when a schema exists in the current database: bind (schema); DuckDB names ignore case.
SELECT count(*) FROM duckdb_schemas()
WHERE database_name = current_database() AND lower(schema_name) = lower(?)
