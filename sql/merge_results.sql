-- Merge staged rows into the results table by id (the newest staged row per id wins).
-- BY NAME, never by position: a results table written by an older version may order columns differently.
-- A matched row takes the staged columns only: columns the run does not write (a user's own, an older
-- format's) keep their values.
MERGE INTO @table AS r
USING (
    SELECT * FROM @staging
    QUALIFY row_number() OVER (PARTITION BY id ORDER BY created_at DESC, run_id DESC) = 1
) AS s
ON r.id = s.id
WHEN MATCHED THEN UPDATE BY NAME
WHEN NOT MATCHED THEN INSERT BY NAME
