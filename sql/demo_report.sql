-- Demo: a spread-out sample of labels next to the gold label and the review.
SELECT r.id, m.title, left(r.review, 70) AS review, r.gold, l.label, round(l.score, 3) AS p, l.status
FROM @results AS l
JOIN @reviews AS r USING (id)
JOIN @movies AS m USING (movie)
ORDER BY hash(r.id), r.id
LIMIT ?
