-- 1 when the runs table already holds this run (a retried load writes nothing twice).
SELECT count(*) FROM @table WHERE run_id = ?
