-- Merge staged rows into the results table by id (the newest staged row per id wins).
MERGE INTO @table AS r
USING (
    SELECT * FROM @staging
    QUALIFY row_number() OVER (PARTITION BY id ORDER BY created_at DESC, run_id DESC) = 1
) AS s
ON r.id = s.id
WHEN MATCHED THEN UPDATE SET *
WHEN NOT MATCHED THEN INSERT *
