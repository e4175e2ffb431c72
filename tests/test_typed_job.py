"""A typed generate job end to end (render, plan, infer, stage, load): typed columns in DuckDB,
error rows for outputs cut by max_tokens, the rest of the job complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchllm.backends.native import NativeBackend
from tests.product_fixtures import make_reviews_db, query, spec_dict
from tests.test_scoring_job import run_job

FIELDS = {"sentiment": ["positive", "negative"], "mentions_acting": "bool", "word": "str"}


@pytest.fixture
def shared_engine(engine, monkeypatch: pytest.MonkeyPatch):
    """The session's engine behind the native backend (no second model load)."""

    def init(self, model: str, device: str, **options) -> None:
        self._engine, self._stats = engine, {}

    monkeypatch.setattr(NativeBackend, "__init__", init)
    monkeypatch.setattr(NativeBackend, "close", lambda self: None)
    return engine


def _spec(db: Path, table: str, max_tokens: int, **fmt) -> dict:
    return spec_dict(
        db,
        table=table,
        prompt={
            "system": "Answer in JSON: sentiment, mentions_acting, word (one word).",
            "user": "Review: {{ review }}",
        },
        task={"kind": "generate", "format": {"fields": FIELDS, "whitespace": "compact", **fmt}},
        sampling={"max_tokens": max_tokens},
    )


def test_typed_job_writes_struct_columns(tmp_path: Path, shared_engine) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 3)
    run_job(_spec(db, "facts", 32, jump_forward=True))
    types = dict(
        query(db, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'facts'")
    )
    assert types["parsed"] == "STRUCT(sentiment VARCHAR, mentions_acting BOOLEAN, word VARCHAR)"
    rows = query(
        db, "SELECT status, error, output, parsed.sentiment, parsed.mentions_acting FROM facts ORDER BY id"
    )
    assert len(rows) == 3 and any(r[0] == "ok" for r in rows)
    for status, error, output, sentiment, acting in rows:
        if status == "ok":
            value = json.loads(output)
            assert error is None and (sentiment, acting) == (value["sentiment"], value["mentions_acting"])
            assert sentiment in ("positive", "negative") and isinstance(acting, bool)
        else:
            assert "cut by max_tokens" in error and sentiment is None


def test_outputs_cut_by_max_tokens_are_error_rows(tmp_path: Path, shared_engine) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 3)
    run_job(_spec(db, "cut", 3, columns="flat"))
    types = dict(
        query(db, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'cut'")
    )
    assert (types["sentiment"], types["mentions_acting"], types["word"]) == ("VARCHAR", "BOOLEAN", "VARCHAR")
    rows = query(db, "SELECT status, finish_reason, error, output, sentiment FROM cut")
    assert len(rows) == 3
    for status, reason, error, output, sentiment in rows:
        assert (status, reason, sentiment) == ("error", "length", None)
        assert "cut by max_tokens" in error and output.startswith("{")


def test_changed_format_is_refused_before_inference(tmp_path: Path, shared_engine) -> None:
    """A format whose columns no longer fit the results table fails naming task.format, before any
    model work, and leaves the table as it was; struct and flat columns alike."""
    from batchllm.spec import SpecError

    db = make_reviews_db(tmp_path / "w.duckdb", 2)
    for columns in ("struct", "flat"):
        run_job(_spec(db, f"t_{columns}", 32, jump_forward=True, columns=columns))
        before = query(db, f"SELECT * FROM t_{columns} ORDER BY id")
        changed = _spec(db, f"t_{columns}", 32, jump_forward=True, columns=columns)
        changed["task"]["format"]["fields"] = {**FIELDS, "mentions_acting": "int"}
        with pytest.raises(
            SpecError, match=r"task.format: the results table 't_.*' has (parsed|mentions_acting)"
        ):
            run_job(changed)
        assert query(db, f"SELECT * FROM t_{columns} ORDER BY id") == before
