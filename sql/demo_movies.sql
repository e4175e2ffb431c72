-- Demo warehouse: one row per movie with its plot (from a registered Arrow table of the corpus).
CREATE OR REPLACE TABLE movies AS
SELECT movie_name AS movie, any_value(title) AS title, any_value(text) AS plot
FROM @corpus
WHERE category = 'plot'
GROUP BY movie_name
ORDER BY movie
