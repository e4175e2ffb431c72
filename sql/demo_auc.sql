-- Demo: how well P(positive) ranks fresh reviews above rotten ones (AUC over ok rows; 0.5 = chance).
WITH s AS (
    SELECT l.label_probs['positive'] AS p, r.gold = 'positive' AS is_positive
    FROM @results AS l
    JOIN @reviews AS r USING (id)
    WHERE l.status = 'ok'
)
SELECT avg(CASE WHEN a.p > b.p THEN 1.0 WHEN a.p = b.p THEN 0.5 ELSE 0.0 END)
FROM s AS a, s AS b
WHERE a.is_positive AND NOT b.is_positive
