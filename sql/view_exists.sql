-- 1 when a view exists in the current database: bind (schema, name); DuckDB names ignore case.
SELECT count(*) FROM duckdb_views()
WHERE database_name = current_database() AND lower(schema_name) = lower(?) AND lower(view_name) = lower(?)
