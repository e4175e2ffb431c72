-- A runs table's latest runs, newest first (its run ids are random: ORDER BY ALL would not be).
SELECT * FROM @table ORDER BY started_at DESC LIMIT ?
