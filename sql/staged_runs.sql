-- Staged rows per run of an interrupted job: what a rerun will recover.
SELECT run_id, count(*) FROM @table GROUP BY run_id ORDER BY run_id
