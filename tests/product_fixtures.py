"""Helpers shared by the product tests (spec, render, warehouse, flow, CLI): small real DuckDB files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

PLOTS = [
    "A retired detective returns to the city to solve one last case involving a missing painter.",
    "Two rival chefs open restaurants on the same street and slowly fall in love.",
    "A crew of astronauts discovers that their ship's computer has been lying to them for years.",
]
REVIEWS = [
    "A gripping, beautifully shot film with terrific performances.",
    "Dull, overlong and predictable; I nearly fell asleep.",
    "Charming and funny from start to finish.",
    "The plot makes no sense and the acting is wooden.",
    "One of the best films of the year.",
    "A tedious mess that wastes a talented cast.",
]


def review_rows(n: int, start: int = 0) -> list[tuple[int, str, str, str]]:
    """``n`` rows (id, plot, review, gold); plots repeat so prompts share prefixes."""
    rows = []
    for i in range(start, start + n):
        review = REVIEWS[i % len(REVIEWS)]
        rows.append((i, PLOTS[i % len(PLOTS)], f"{review} (#{i})", "positive" if i % 2 == 0 else "negative"))
    return rows


def make_reviews_db(path: Path, n: int, table: str = "reviews") -> Path:
    """A DuckDB file with a reviews table of ``n`` rows."""
    con = duckdb.connect(str(path))
    try:
        con.execute(
            f'CREATE OR REPLACE TABLE "{table}" (id INTEGER, plot VARCHAR, review VARCHAR, gold VARCHAR)'
        )
        add_reviews(con, table, review_rows(n))
    finally:
        con.close()
    return path


def add_reviews(con: duckdb.DuckDBPyConnection, table: str, rows: list[tuple[int, str, str, str]]) -> None:
    con.executemany(f'INSERT INTO "{table}" VALUES (?, ?, ?, ?)', rows)


def spec_dict(database: Path | str, table: str = "labels", **over: Any) -> dict[str, Any]:
    """A valid classify job over the reviews table, with keys overridden by ``over``."""
    spec: dict[str, Any] = {
        "name": "test-labels",
        "source": {"database": str(database), "query": "SELECT id, plot, review FROM reviews ORDER BY id"},
        "prompt": {
            "system": "You label movie reviews as positive or negative. Plot of the movie: {{ plot }}",
            "user": "Review: {{ review }}\nIs this review positive or negative?",
        },
        "task": {"kind": "classify", "labels": ["positive", "negative"]},
        "model": "default",
        "device": "cpu",
        "sampling": {"max_tokens": 8},
        "output": {"table": table},
    }
    spec.update(over)
    return spec


def query(database: Path | str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(database))
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()
