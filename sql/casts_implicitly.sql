-- Whether a column of a registered batch casts implicitly to the table's column of the same name (as a
-- MERGE by name would cast it): decided on the two types, no row read.
SELECT can_cast_implicitly((SELECT @column FROM @batch LIMIT 0), (SELECT @column FROM @table LIMIT 0))
