-- Replace the results table with the staged rows (the newest staged row per id).
CREATE OR REPLACE TABLE @table AS
SELECT * FROM @staging
QUALIFY row_number() OVER (PARTITION BY id ORDER BY created_at DESC, run_id DESC) = 1
ORDER BY id
