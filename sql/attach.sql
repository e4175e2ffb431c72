-- Attach another database read-only under an alias: bind (path or connection string).
ATTACH ? AS @alias (TYPE @type, READ_ONLY)
