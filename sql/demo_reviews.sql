-- Demo warehouse: critic snippets of movies that have a plot, labelled by Rotten Tomatoes (fresh/rotten).
CREATE OR REPLACE TABLE reviews AS
SELECT
    CAST(row_number() OVER (ORDER BY c.movie_name, c.line) AS INTEGER) AS id,
    c.movie_name AS movie,
    c.text AS review,
    CASE c.category WHEN 'fresh' THEN 'positive' ELSE 'negative' END AS gold
FROM @corpus AS c
WHERE c.category IN ('fresh', 'rotten')
  AND c.movie_name IN (SELECT movie FROM movies)
ORDER BY id
