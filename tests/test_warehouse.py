"""Warehouse: extract from DuckDB files, Parquet, CSV and attached databases; staged, transactional loads."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from batchllm import browse, output_check, results, warehouse
from batchllm.spec import SpecError, parse_spec
from tests.product_fixtures import make_reviews_db, query, review_rows, spec_dict


def _spec(db: Path, **over):
    return parse_spec(spec_dict(db, **over))


def test_extract_duckdb_file(tmp_path: Path) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 12)
    table = warehouse.extract(_spec(db))
    assert table.num_rows == 12
    assert table.column_names == ["id", "plot", "review"]
    assert table.column("id").to_pylist() == list(range(12))
    limited = warehouse.extract(_spec(db, limits={"max_rows": 5}))
    assert limited.num_rows == 5


def test_extract_parquet_and_csv(tmp_path: Path) -> None:
    rows = review_rows(9)
    data = pa.table({k: [r[i] for r in rows] for i, k in enumerate(["id", "plot", "review", "gold"])})
    pq.write_table(data, tmp_path / "reviews.parquet")
    pacsv.write_csv(data, tmp_path / "reviews.csv")
    out = tmp_path / "out.duckdb"
    for source in (f"read_parquet('{tmp_path / 'reviews.parquet'}')", f"'{tmp_path / 'reviews.csv'}'"):
        spec = parse_spec(
            spec_dict(
                ":memory:",
                source={
                    "database": ":memory:",
                    "query": f"SELECT id, plot, review FROM {source} ORDER BY id",
                },
                output={"database": str(out), "table": "labels"},
            )
        )
        table = warehouse.extract(spec)
        assert table.num_rows == 9
        assert table.column("review").to_pylist() == [r[2] for r in rows]


def test_extract_attached_database(tmp_path: Path) -> None:
    other = make_reviews_db(tmp_path / "other.duckdb", 7)
    make_reviews_db(tmp_path / "main.duckdb", 1)
    spec = parse_spec(
        spec_dict(
            tmp_path / "main.duckdb",
            source={
                "database": str(tmp_path / "main.duckdb"),
                "query": "SELECT id, plot, review FROM src.reviews",
                "attach": [{"alias": "src", "path": str(other)}],
            },
        )
    )
    assert warehouse.extract(spec).num_rows == 7


def test_extract_errors_name_the_field(tmp_path: Path) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 4)
    with pytest.raises(SpecError, match=r"source\.query: .*nosuchtable"):
        warehouse.extract(_spec(db, source={"database": str(db), "query": "SELECT * FROM nosuchtable"}))
    with pytest.raises(SpecError, match=r"prompt\.user: uses 'review'"):
        warehouse.extract(_spec(db, source={"database": str(db), "query": "SELECT id, plot FROM reviews"}))
    dup = "SELECT id % 2 AS id, plot, review FROM reviews"
    with pytest.raises(SpecError, match=r"source\.id_column: 'id' is not unique"):
        warehouse.extract(_spec(db, source={"database": str(db), "query": dup}))
    null = "SELECT CASE WHEN id = 1 THEN NULL ELSE id END AS id, plot, review FROM reviews"
    with pytest.raises(SpecError, match="1 row\\(s\\) have a null 'id'"):
        warehouse.extract(_spec(db, source={"database": str(db), "query": null}))


def test_identifiers_are_quoted() -> None:
    assert warehouse.quote_ident("labels") == '"labels"'
    assert warehouse.quote_ident("s.labels") == '"s"."labels"'
    with pytest.raises(ValueError, match="not a safe SQL identifier"):
        warehouse.quote_ident('x"; DROP TABLE y; --')
    text = warehouse.sql("merge_results", table="order", staging="select")
    assert 'MERGE INTO "order"' in text and 'FROM "select"' in text
    with pytest.raises(ValueError, match="plain word"):
        warehouse.sql("attach", alias="a", keywords={"type": "duckdb); DROP"})


def _results(spec, ids: list[int], run_id: str, label: str, status: str = "ok") -> pa.Table:
    n = len(ids)
    schema = results.results_schema(pa.int32())
    cols = {
        "id": ids,
        "prompt_hash": [f"h{i}" for i in ids],
        "model": [spec.model] * n,
        "params_hash": [spec.params_hash] * n,
        "task": ["classify"] * n,
        "output": [None] * n,
        "label": [label] * n,
        "score": [0.75] * n,
        "label_probs": [[("positive", 0.75), ("negative", 0.25)]] * n,
        "prompt_tokens": [10] * n,
        "output_tokens": [0] * n,
        "cached_tokens": [4] * n,
        "finish_reason": ["stop"] * n,
        "status": [status] * n,
        "error": [None if status == "ok" else "boom"] * n,
        "run_id": [run_id] * n,
        "created_at": warehouse.timestamps(n, warehouse.now()),
    }
    return pa.table([pa.array(cols[f.name], f.type) for f in schema], schema=schema)


def test_stage_and_merge(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    spec = _spec(db)
    assert warehouse.stage(spec, _results(spec, [1, 2, 3], "r1", "positive")) == 3
    assert warehouse.done_keys(spec, include_results=False).num_rows == 3
    assert warehouse.load(spec, {"run_id": "r1", "rows_ok": 3}) == 3
    assert not query(db, "SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE 'batchllm_staging%'")[0][
        0
    ]
    # A second run: ids 3 and 4, with a newer staged row for 3 winning over an older one.
    warehouse.stage(spec, _results(spec, [3], "r2", "stale"))
    warehouse.stage(spec, _results(spec, [3, 4], "r2", "negative"))
    assert warehouse.load(spec, {"run_id": "r2", "rows_ok": 2}) == 2  # rows written, not rows staged
    rows = query(db, "SELECT id, label, label_probs['positive'], run_id FROM labels ORDER BY id")
    assert rows == [
        (1, "positive", 0.75, "r1"),
        (2, "positive", 0.75, "r1"),
        (3, "negative", 0.75, "r2"),
        (4, "negative", 0.75, "r2"),
    ]
    runs = query(db, "SELECT run_id, rows_ok FROM batchllm_runs ORDER BY run_id")
    assert runs == [("r1", 3), ("r2", 2)]
    types = dict(
        query(db, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name='labels'")
    )
    assert types["label_probs"] == "MAP(VARCHAR, DOUBLE)"
    assert types["id"] == "INTEGER"
    assert types["created_at"] == "TIMESTAMP WITH TIME ZONE"
    keys = warehouse.done_keys(spec, include_results=True)
    assert sorted(keys.column("id").to_pylist()) == [1, 2, 3, 4]


def test_replace_mode(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    merge = _spec(db)
    warehouse.stage(merge, _results(merge, [1, 2, 3], "r1", "positive"))
    warehouse.load(merge, {"run_id": "r1"})
    replace = _spec(db, output={"table": "labels", "mode": "replace"})
    warehouse.stage(replace, _results(replace, [2, 5], "r2", "negative"))
    warehouse.load(replace, {"run_id": "r2"})
    assert query(db, "SELECT id, label FROM labels ORDER BY id") == [(2, "negative"), (5, "negative")]
    warehouse.load(replace, {"run_id": "r3"})  # nothing staged: replace empties the table
    assert query(db, "SELECT count(*) FROM labels") == [(0,)]


def test_failed_load_changes_nothing_and_keeps_staging(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    spec = _spec(db)
    warehouse.stage(spec, _results(spec, [1, 2], "r1", "positive"))
    warehouse.load(spec, {"run_id": "r1", "rows_ok": 2})
    warehouse.stage(spec, _results(spec, [2, 3], "r2", "negative"))
    # A run record whose column type clashes with the runs table makes the load fail half-way.
    with pytest.raises(warehouse.WarehouseError, match="loading the results failed, nothing was written"):
        warehouse.load(spec, {"run_id": "r2", "rows_ok": "not a number"})
    assert query(db, "SELECT id, label FROM labels ORDER BY id") == [(1, "positive"), (2, "positive")]
    assert query(db, "SELECT count(*) FROM batchllm_runs") == [(1,)]
    assert warehouse.done_keys(spec, include_results=False).num_rows == 2
    warehouse.load(spec, {"run_id": "r2", "rows_ok": 2})
    assert query(db, "SELECT id, label FROM labels ORDER BY id") == [
        (1, "positive"),
        (2, "negative"),
        (3, "negative"),
    ]


def test_prune_staging_drops_stale_rows(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    spec = _spec(db)
    warehouse.stage(spec, _results(spec, [1, 2, 3], "r1", "positive"))
    keys = pa.table({"id": pa.array([1, 2, 3], pa.int32()), "prompt_hash": ["h1", "changed", "h3"]})
    assert warehouse.prune_staging(spec, keys) == 1
    assert sorted(warehouse.done_keys(spec, include_results=False).column("id").to_pylist()) == [1, 3]


def test_prune_staging_keeps_rows_this_run_does_not_read_unless_replacing(tmp_path: Path) -> None:
    """A rerun reading fewer rows (a smaller limits.max_rows) keeps the staged rows it does not read: the
    load merges them. A replace run makes the table its own rows: it drops them."""
    db = tmp_path / "w.duckdb"
    spec = _spec(db)
    warehouse.stage(spec, _results(spec, [1, 2, 3], "r1", "positive"))
    keys = pa.table({"id": pa.array([1], pa.int32()), "prompt_hash": ["h1"]})
    assert warehouse.prune_staging(spec, keys) == 0
    warehouse.load(spec, {"run_id": "r2"})
    assert query(db, "SELECT id FROM labels ORDER BY id") == [(1,), (2,), (3,)]
    replace = _spec(db, output={"table": "labels", "mode": "replace"})
    warehouse.stage(replace, _results(replace, [1, 2, 3], "r3", "negative"))
    assert warehouse.prune_staging(replace, keys) == 2
    warehouse.load(replace, {"run_id": "r4"})
    assert query(db, "SELECT id, label FROM labels") == [(1, "negative")]


def test_show(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    spec = _spec(db)
    warehouse.stage(spec, _results(spec, [3, 1, 2], "r1", "positive"))
    warehouse.load(spec, {"run_id": "r1"})
    assert browse.show(str(db), "labels", limit=2).column("id").to_pylist() == [1, 2]  # by id
    with pytest.raises(SpecError, match="does not exist"):
        browse.show(str(db), "nope")


def test_show_lists_the_latest_runs_first(tmp_path: Path) -> None:
    """Run ids are random: the runs table is shown newest first, with the columns to pick a run by."""
    from batchllm.table_view import useful_columns

    db = tmp_path / "w.duckdb"
    spec = _spec(db)
    for run_id, hour in (("c0ffee", 1), ("0aaa", 3), ("f00d", 2)):
        run = {
            "run_id": run_id,
            "job": "j",
            "started_at": f"2026-12-05T0{hour}:00:00+00:00",
            "rows_processed": 1,
        }
        warehouse.load(spec, run)
    rows = browse.show(str(db), "batchllm_runs", limit=2)
    assert rows.column("run_id").to_pylist() == ["0aaa", "f00d"]
    assert useful_columns(rows) == ["run_id", "job", "started_at", "rows_processed"]


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("SELECT id, plot, review FROM reviews; CREATE TABLE pwned AS SELECT 1", "SELECT, CREATE"),
        ("PRAGMA version", "PRAGMA"),
        (
            "SELECT 1 AS id, 'x' AS plot, 'y' AS review) AS q; CREATE TABLE pwned AS SELECT 1; SELECT * FROM (SELECT 1",
            None,
        ),
    ],
)
def test_the_query_is_one_select(tmp_path: Path, text: str, got: str | None) -> None:
    """The query is pasted into the statements that read it: a second statement, a write hidden in it
    included, is refused before anything runs (a dry run wrote the table before)."""
    db = make_reviews_db(tmp_path / "w.duckdb", 2)
    spec = _spec(db, source={"database": str(db), "query": text})
    with pytest.raises(
        SpecError, match="source.query: " + ("must be one SELECT statement, got " + got if got else "")
    ):
        warehouse.describe(spec)
    with pytest.raises(SpecError, match=r"source\.query"):
        warehouse.extract(spec)
    assert query(db, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'pwned'") == [(0,)]


def test_malformed_csv_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv"
    path.write_text("id,plot,review\n" + "".join(f"{i},p,r\n" for i in range(30000)) + "30000,p,r,extra\n")
    spec = parse_spec(
        spec_dict(
            ":memory:",
            source={"database": ":memory:", "query": f"SELECT * FROM read_csv('{path}', quote = '\"')"},
            output={"database": str(tmp_path / "out.duckdb"), "table": "labels"},
        )
    )
    with pytest.raises(SpecError, match=r"^source\.query: .*CSV Error"):
        warehouse.extract(spec)


def test_missing_source_database_is_named(tmp_path: Path) -> None:
    spec = _spec(tmp_path / "nope.duckdb")
    with pytest.raises(SpecError, match=r"source\.database: no such file"):
        warehouse.extract(spec)
    assert not (tmp_path / "nope.duckdb").exists()


def _hold(db: Path, seconds: float):
    """Another process holding ``db`` open for writing for ``seconds``; returns once it holds it."""
    import subprocess
    import sys

    code = f"import duckdb, time; c = duckdb.connect({str(db)!r}); print('ok', flush=True); time.sleep({seconds})"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
    return holder


def test_locked_database_is_waited_for_then_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 3)
    spec = _spec(db)
    monkeypatch.setenv("BATCHLLM_LOCK_TIMEOUT_S", "1")
    holder = _hold(db, 60)
    try:
        with pytest.raises(warehouse.WarehouseError, match=r"is locked by another process .*held by .*PID"):
            warehouse.stage(spec, _results(spec, [1], "r1", "positive"))
    finally:
        holder.kill()
        holder.wait()
    # A lock released within the bounded wait is waited out: the write goes through.
    monkeypatch.setenv("BATCHLLM_LOCK_TIMEOUT_S", "60")
    holder = _hold(db, 1.5)
    try:
        assert warehouse.stage(spec, _results(spec, [1], "r1", "positive")) == 1
    finally:
        holder.wait()
    assert warehouse.done_keys(spec, include_results=False).num_rows == 1


def test_merge_keeps_columns_the_run_does_not_write(tmp_path: Path) -> None:
    """A column a user added to the results table survives a rerun that merges over its rows."""
    db = tmp_path / "w.duckdb"
    spec = _spec(db)
    warehouse.stage(spec, _results(spec, [1, 2], "r1", "positive"))
    warehouse.load(spec, {"run_id": "r1"})
    con = duckdb.connect(str(db))
    con.execute("ALTER TABLE labels ADD COLUMN reviewed BOOLEAN; UPDATE labels SET reviewed = true")
    con.close()
    warehouse.stage(spec, _results(spec, [2, 3], "r2", "negative"))
    warehouse.load(spec, {"run_id": "r2"})
    assert query(db, "SELECT id, label, reviewed FROM labels ORDER BY id") == [
        (1, "positive", True),
        (2, "negative", True),
        (3, "negative", None),
    ]


def _run_schema(id_type: pa.DataType) -> pa.Schema:
    return results.results_schema(id_type)


def test_output_table_that_is_not_a_results_table_is_refused(tmp_path: Path) -> None:
    """Naming the source table as output.table fails before any model work and leaves it as it was."""
    db = make_reviews_db(tmp_path / "w.duckdb", 4)
    for mode in ("merge", "replace"):
        spec = _spec(db, output={"table": "Reviews", "mode": mode}, incremental=False)
        with pytest.raises(SpecError, match=r"output.table: 'Reviews' exists and is not a results table"):
            output_check.check_output(spec, _run_schema(pa.int32()))
    assert query(db, "SELECT count(*), count(review) FROM reviews") == [(4, 4)]


def test_a_runs_table_that_is_not_one_is_refused(tmp_path: Path) -> None:
    """output.runs_table naming the source or a results table fails before any model work (the run's
    record would widen that table and add a row of NULLs); a real runs table is fine."""
    db = make_reviews_db(tmp_path / "w.duckdb", 4)
    results_spec = _spec(db)
    warehouse.stage(results_spec, _results(results_spec, [1], "r1", "positive"))
    warehouse.load(results_spec, {"run_id": "r1", "started_at": "2026-12-05", "rows_processed": 1})
    output_check.check_output(results_spec, _run_schema(pa.int32()))  # batchllm_runs is a runs table
    for runs in ("reviews", "labels"):
        spec = _spec(db, output={"table": "other", "runs_table": runs})
        with pytest.raises(SpecError, match=rf"output.runs_table: '{runs}' exists and is not a runs table"):
            output_check.check_output(spec, _run_schema(pa.int32()))


def test_output_column_types_must_match(tmp_path: Path) -> None:
    """A changed id type is named (source.id_column) before the run, in merge mode; replace rewrites."""
    db = tmp_path / "w.duckdb"
    spec = _spec(db)
    warehouse.stage(spec, _results(spec, [1, 2], "r1", "positive"))
    warehouse.load(spec, {"run_id": "r1"})
    output_check.check_output(spec, _run_schema(pa.int32()))  # the same types: fine
    with pytest.raises(
        SpecError, match=r"source.id_column: .* has id INTEGER where this run writes id DOUBLE"
    ):
        output_check.check_output(spec, _run_schema(pa.float64()))
    with pytest.raises(SpecError, match=r"source.id_column: .* id VARCHAR"):
        output_check.check_output(spec, _run_schema(pa.string()))
    replace = _spec(db, output={"table": "labels", "mode": "replace"}, incremental=False)
    output_check.check_output(replace, _run_schema(pa.string()))


def test_output_schema_must_exist(tmp_path: Path) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 2)
    spec = _spec(db, output={"table": "analytics.labels"})
    with pytest.raises(SpecError, match=r"output.table: schema 'analytics' does not exist"):
        output_check.check_output(spec, _run_schema(pa.int32()))
    con = duckdb.connect(str(db))
    con.execute("CREATE SCHEMA analytics")
    con.close()
    output_check.check_output(spec, _run_schema(pa.int32()))
    audit = _spec(db, output={"table": "labels", "runs_table": "audit.runs"})
    with pytest.raises(SpecError, match=r"output.runs_table: schema 'audit' does not exist"):
        output_check.check_output(audit, _run_schema(pa.int32()))


def test_a_view_is_not_an_output_table(tmp_path: Path) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 2)
    con = duckdb.connect(str(db))
    con.execute("CREATE VIEW recent AS SELECT * FROM reviews")
    con.close()
    with pytest.raises(SpecError, match=r"output.table: 'Recent' is a view"):
        output_check.check_output(_spec(db, output={"table": "Recent"}), _run_schema(pa.int32()))
    runs_view = _spec(db, output={"table": "labels", "runs_table": "recent"})
    with pytest.raises(SpecError, match=r"output.runs_table: 'recent' is a view"):
        output_check.check_output(runs_view, _run_schema(pa.int32()))


def test_types_the_merge_casts_safely_are_taken(tmp_path: Path) -> None:
    """A run's id that widens the table's (INTEGER -> BIGINT) merges; a narrowing one is refused."""
    db = tmp_path / "w.duckdb"
    spec = _spec(db)
    warehouse.stage(spec, _results(spec, [1], "r1", "positive"))
    warehouse.load(spec, {"run_id": "r1"})
    con = duckdb.connect(str(db))
    con.execute("ALTER TABLE labels ALTER id TYPE BIGINT")
    con.close()
    output_check.check_output(spec, _run_schema(pa.int32()))  # INTEGER into BIGINT: the merge widens it
    with pytest.raises(
        SpecError, match=r"source.id_column: .* has id BIGINT where this run writes id DECIMAL\(38,0\)"
    ):
        output_check.check_output(spec, _run_schema(pa.decimal128(38, 0)))


def test_runs_table_name_ignores_case(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"output.runs_table: must differ"):
        _spec(tmp_path / "w.duckdb", output={"table": "Labels", "runs_table": "labels"})


def test_query_may_end_in_a_comment(tmp_path: Path) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 3)
    spec = _spec(
        db, source={"database": str(db), "query": "SELECT id, plot, review FROM reviews -- all of them"}
    )
    assert warehouse.describe(spec) == ["id", "plot", "review"]
    assert warehouse.extract(spec).num_rows == 3


def test_incremental_max_rows_caps_the_rows_to_run(tmp_path: Path) -> None:
    """An incremental job's max_rows is the rows to run, the first not done yet: a cap on the rows
    read would read the same first rows, all done, every night. Edits that change no result (engine
    options, shards, the cap) keep the staging of an interrupted run."""
    from batchllm import job
    from batchllm.backends.base import Outcome

    db = make_reviews_db(tmp_path / "w.duckdb", 12)
    spec = _spec(db, incremental=True, limits={"max_rows": 5})
    seen = []
    for _ in range(3):
        prepared = job.prepare(spec, warehouse.extract(spec))
        ids = prepared.prompts.rows.column("id").to_pylist()
        seen.append(ids)
        outcomes = [
            Outcome(prompt_tokens=3, label="positive", label_probs={"positive": 1.0, "negative": 0.0})
        ]
        indices = list(range(prepared.prompts.num_prompts))
        warehouse.stage(spec, results.result_rows(spec, prepared, indices, outcomes * len(indices)))
        warehouse.load(spec, {"run_id": prepared.run_id, "rows_ok": len(ids)})
    assert seen == [list(range(5)), list(range(5, 10)), [10, 11]]
    tuned = spec.updated(engine_options={"max_num_batched_tokens": 512}, shards=3, limits={"max_rows": 2})
    assert warehouse.staging_table(tuned) == warehouse.staging_table(spec)
