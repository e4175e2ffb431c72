-- Demo: accuracy of the ok labels against the gold labels, and counts by status.
SELECT
    count(*) FILTER (WHERE l.status = 'ok') AS ok,
    count(*) FILTER (WHERE l.status <> 'ok') AS errors,
    avg(CASE WHEN l.label = r.gold THEN 1.0 ELSE 0.0 END) FILTER (WHERE l.status = 'ok') AS accuracy,
    avg(CASE WHEN r.gold = 'positive' THEN 1.0 ELSE 0.0 END) AS positive_share
FROM @results AS l
JOIN @reviews AS r USING (id)
