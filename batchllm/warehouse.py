"""DuckDB I/O: extract rows as Arrow, stage results, merge them in one transaction.

The results table's schema lives in results.py; the runs table takes the
columns of the run record (report.py). Every statement is a file in
``batchllm.sql`` loaded by name; values are bound with ``?`` and identifiers
(checked by the spec, then double-quoted here) are the only text substituted.

Durability: each finished inference shard is appended to a staging table named
after the spec hash, in its own transaction. ``load`` merges staging into the
results table, records the run and drops staging in one transaction. A crash
before ``load`` leaves the results table untouched and the finished shards in
staging; the rerun of the same spec picks them up instead of recomputing.

Faults (docs/faults.md): ``connect`` waits, bounded, for another process's
lock on the file and every write is one transaction that rolls back on any
failure (connection.py); tables written by an older version gain the newer
columns (merged by name, never by position) instead of failing the load; a
retried load of a run already recorded writes nothing.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from batchllm.connection import WarehouseError, open_database, transaction
from batchllm.faults import pause_point
from batchllm.spec import JobSpec, SpecError, check_identifier, validate_columns

_KEYWORD = re.compile(r"^[a-z]+$")
RUNS_MARKS = ("run_id", "started_at", "rows_processed")  # columns every runs table has


class _SqlTemplate(string.Template):
    delimiter = "@"


@cache
def _statement(name: str) -> _SqlTemplate:
    return _SqlTemplate(files("batchllm.sql").joinpath(f"{name}.sql").read_text())


def quote_ident(name: str) -> str:
    """Double-quote a checked ``name`` or ``schema.name`` for DuckDB."""
    check_identifier(name, "identifier")
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def sql(
    name: str, query: str | None = None, keywords: dict[str, str] | None = None, **identifiers: str
) -> str:
    """The statement ``sql/<name>.sql`` with identifiers quoted in.

    ``query`` is the job's own SELECT (trusted, it is the job); ``keywords`` are
    lowercase words from an allow-list the spec enforces (e.g. an ATTACH type).
    """
    values = {k: quote_ident(v) for k, v in identifiers.items()}
    if query is not None:
        values["query"] = query
    for k, v in (keywords or {}).items():
        if not _KEYWORD.match(v):
            raise ValueError(f"sql keyword {k}={v!r} is not a plain word")
        values[k] = v
    return _statement(name).substitute(values)


@contextmanager
def connect(
    database: str, attach: list[Any] | None = None, read_only: bool = False, wait: bool = True
) -> Iterator[duckdb.DuckDBPyConnection]:
    """One connection to ``database`` (a file path or ``:memory:``), attached sources, closed on exit.

    A file locked by another process is waited for (``wait``, bounded) rather than failed at once.
    """
    con = open_database(database, read_only and database != ":memory:", wait)
    try:
        for a in attach or []:
            try:
                con.execute(sql("attach", alias=a.alias, keywords={"type": a.type}), [a.path])
            except duckdb.Error as exc:
                raise SpecError(f"source.attach: cannot attach {a.path!r} as {a.alias!r} ({exc})") from None
        yield con
    finally:
        con.close()


def split_table(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return schema or "main", name


def table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(scalar(con, sql("table_exists"), list(split_table(table))))


def scalar(con: duckdb.DuckDBPyConnection, statement: str, params: list[Any] | None = None) -> Any:
    """The first value of a one-row result (fetched completely, so the connection is free again)."""
    rows = con.execute(statement, params or []).fetchall()
    return rows[0][0] if rows else None


def staging_table(spec: JobSpec) -> str:
    """Staging is per spec: an interrupted run of the same spec finds its finished shards there."""
    schema, _ = split_table(spec.output.table)
    name = f"batchllm_staging_{spec.spec_hash[:16]}"
    return name if schema == "main" else f"{schema}.{name}"


# --- extract -----------------------------------------------------------------------------------


def _source(spec: JobSpec) -> Any:
    """A connection for reading the source: read-only unless results go to the same file."""
    database = spec.source.database
    if database != ":memory:" and not Path(database).is_file():
        # duckdb.connect would create an empty database and the query would fail confusingly.
        raise SpecError(f"source.database: no such file {database!r}")
    read_only = database != spec.output_database
    return connect(spec.source.database, spec.source.attach, read_only=read_only)


def extract(spec: JobSpec) -> pa.Table:
    """Run the job's query (up to ``limits.max_rows`` rows unless incremental) and return it as Arrow.

    Checks the query's columns against the spec before reading rows, and that ids
    are present and unique (merge by id needs both).
    """
    with _source(spec) as con:
        validate_columns(spec, _columns(con, spec))
        try:
            table = con.sql(
                sql("extract", query=spec.source.query), params=[_read_limit(spec)]
            ).to_arrow_table()
        except duckdb.Error as exc:  # e.g. a malformed CSV line: the query cannot run as written
            raise SpecError(f"source.query: reading the rows failed: {exc}") from None
        check_ids(con, table, spec.source.id_column)
    return table


def _read_limit(spec: JobSpec) -> int | None:
    """limits.max_rows caps the rows read, or for an incremental job the rows to run (job.prepare): a
    cap on the rows read would read the same first rows, all done, every night."""
    return None if spec.incremental else spec.limits.max_rows


def describe(spec: JobSpec) -> list[str]:
    """Column names of the job's query result (validates the query without reading rows)."""
    with _source(spec) as con:
        return _columns(con, spec)


def _columns(con: duckdb.DuckDBPyConnection, spec: JobSpec) -> list[str]:
    """The query's column names (bound, not run); the id column's type is checked here too. The query
    is one SELECT: it is pasted into statements (describe, extract), so a second statement in it would
    run there, a write in a dry run included."""
    try:
        statements = con.extract_statements(spec.source.query)
    except duckdb.Error as exc:
        raise SpecError(f"source.query: {exc}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(s.type.name for s in statements)
        raise SpecError(f"source.query: must be one SELECT statement, got {kinds}")
    try:
        relation = con.sql(sql("describe_query", query=spec.source.query))
        names, types = relation.columns, relation.types
    except duckdb.Error as exc:
        raise SpecError(f"source.query: {exc}") from None
    if spec.source.id_column in names:
        check_id_type(spec.source.id_column, types[names.index(spec.source.id_column)])
    return names


# Id types that survive DuckDB -> Arrow -> DuckDB with their values, equality and type. Not:
# HUGEINT (DECIMAL(38,0), wraps beyond 38 digits), UUID (VARCHAR), TIMETZ (loses its zone),
# BIT and BIGNUM (bytes), ENUM and nested types (not joinable in Arrow).
ID_TYPES = frozenset(
    {
        *("tinyint", "smallint", "integer", "bigint", "utinyint", "usmallint", "uinteger", "ubigint"),
        *("decimal", "float", "double", "varchar", "blob", "boolean", "interval", "date", "time"),
        *("timestamp", "timestamp_s", "timestamp_ms", "timestamp_ns", "timestamp with time zone"),
    }
)


def check_id_type(column: str, dtype: Any) -> None:
    if getattr(dtype, "id", str(dtype).lower()) not in ID_TYPES:
        raise SpecError(
            f"source.id_column: {column!r} has type {dtype}, which results cannot be merged by; "
            f"cast it in the query (e.g. CAST({column} AS VARCHAR) AS {column})"
        )


def check_ids(con: duckdb.DuckDBPyConnection, table: pa.Table, column: str) -> None:
    """Every id present and unique by DuckDB's own equality, the one the MERGE uses (INTERVAL
    '1 day' = '24 hours', 0.0 = -0.0): a duplicate here would be a row silently lost there."""
    ids = register(con, table.select([column]).rename_columns(["id"]))
    nulls, dup = con.execute(sql("check_ids", ids=ids)).fetchall()[0]
    if nulls:
        raise SpecError(f"source.id_column: {nulls} row(s) have a null {column!r}; every row needs an id")
    if dup is not None:
        raise SpecError(
            f"source.id_column: {column!r} is not unique in the query result (e.g. {dup!r} repeats)"
        )


def done_keys(spec: JobSpec, include_results: bool, include_staging: bool = True) -> pa.Table:
    """(id, prompt_hash) with an ok result for this model + params in staging and/or the results table."""
    parts: list[pa.Table] = []
    tables = ([staging_table(spec)] if include_staging else []) + (
        [spec.output.table] if include_results else []
    )
    # Nothing written yet when the file is absent; opening it would create it (a dry run writes nothing).
    if Path(spec.output_database).exists():
        with connect(spec.output_database) as con:
            for table in tables:
                if table_exists(con, table):
                    q = sql("done_keys", table=table)
                    parts.append(con.sql(q, params=[spec.model, spec.params_hash]).to_arrow_table())
    if not parts:
        return pa.table({"id": pa.array([], pa.null()), "prompt_hash": pa.array([], pa.string())})
    if len(parts) == 2 and parts[0].schema != parts[1].schema:
        parts[1] = parts[1].cast(parts[0].schema)
    return pa.concat_tables(parts)


# --- load --------------------------------------------------------------------------------------


def register(con: duckdb.DuckDBPyConnection, table: pa.Table) -> str:
    name = f"batchllm_arrow_{id(table):x}"
    con.register(name, table)
    return name


def prune_staging(spec: JobSpec, keys: pa.Table) -> int:
    """Drop staged rows whose prompt changed since they were computed (an id of ``keys`` with another
    prompt_hash); in replace mode also rows of ids not in ``keys`` (the table becomes this run's rows).
    Returns rows dropped."""
    whole_run = "true" if spec.output.mode == "replace" else "false"
    with connect(spec.output_database) as con:
        staging = staging_table(spec)
        if not table_exists(con, staging):
            return 0
        view = register(con, keys.select(["id", "prompt_hash"]))
        statement = sql("prune_staging", keywords={"whole_run": whole_run}, staging=staging, keys=view)
        return int(scalar(con, statement))  # DELETE returns its count


def stage(spec: JobSpec, rows: pa.Table) -> int:
    """Append result rows (``results.results_schema``) to the spec's staging table, durably. Returns rows staged."""
    if rows.num_rows == 0:
        return 0
    with connect(spec.output_database) as con:
        staging = staging_table(spec)
        view = register(con, rows)
        with transaction(con, "staging results", spec.output_database):
            con.execute(sql("create_like", table=staging, like=view))
            _widen(con, staging, view)
            con.execute(sql("insert_by_name", table=staging, batch=view))
            pause_point("stage")
    return rows.num_rows


def load(spec: JobSpec, run: dict[str, Any]) -> int:
    """Merge (or replace) staged rows into the results table and record ``run``, in one transaction.

    Returns the number of rows written. With nothing staged the results table is
    left as it is (merge) or emptied (replace), and the run is still recorded.
    A run already recorded (a retry after a commit whose reply was lost) writes nothing.
    ``run["timings"]["load_s"]`` is set to the time up to its recording, so the runs table has it too.
    """
    t0 = time.perf_counter()
    with connect(spec.output_database) as con:
        staging = staging_table(spec)
        results = spec.output.table
        runs = spec.output.runs_table
        with transaction(con, "loading the results", spec.output_database):
            if table_exists(con, runs) and scalar(con, sql("run_recorded", table=runs), [run["run_id"]]):
                return 0
            written = 0
            if table_exists(con, staging):
                written = int(scalar(con, sql("count_ids", table=staging)))
                con.execute(sql("create_like", table=results, like=staging))
                statement = "replace_results" if spec.output.mode == "replace" else "merge_results"
                if statement == "merge_results":  # merged by name: the table gains the run's new columns
                    _widen(con, results, staging)
                con.execute(sql(statement, table=results, staging=staging))
                con.execute(sql("drop_table", table=staging))
            elif spec.output.mode == "replace" and table_exists(con, results):
                con.execute(sql("delete_all", table=results))
            run["timings"] = {**run.get("timings", {}), "load_s": time.perf_counter() - t0}
            run_row = register(con, runs_row(run))
            con.execute(sql("create_like", table=runs, like=run_row))
            _widen(con, runs, run_row)
            con.execute(sql("insert_by_name", table=runs, batch=run_row))
            pause_point("load")
    return written


def column_types(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, tuple[str, str]]:
    """Lowercased column name -> (name, DuckDB type) of a table or registered batch (names ignore case)."""
    relation = con.sql(sql("columns", table=table))
    return {name.lower(): (name, str(t)) for name, t in zip(relation.columns, relation.types, strict=True)}


def _widen(con: duckdb.DuckDBPyConnection, table: str, like: str) -> None:
    """Give ``table`` the columns of ``like`` it lacks (NULL in its rows): a table written by an
    older version takes a newer version's rows instead of failing the run at its last step."""
    if set(column_types(con, like)) - set(column_types(con, table)):
        con.execute(sql("widen_table", table=table, like=like))


def staged_rows(spec: JobSpec, wait: bool = True) -> dict[str, int] | None:
    """Rows per run id in the spec's staging table: what a rerun recovers (None when unknown)."""
    if not Path(spec.output_database).exists():
        return {}
    try:
        with connect(spec.output_database, wait=wait) as con:
            staging = staging_table(spec)
            if not table_exists(con, staging):
                return {}
            return dict(con.execute(sql("staged_runs", table=staging)).fetchall())
    except (WarehouseError, duckdb.Error):
        return None


def runs_row(run: dict[str, Any]) -> pa.Table:
    """One row of the runs table: scalars as columns, nested stats as JSON text."""
    import json

    out: dict[str, pa.Array] = {}
    for key, value in run.items():
        if isinstance(value, dict | list):
            out[key] = pa.array([json.dumps(value, sort_keys=True, default=str)], pa.string())
        elif isinstance(value, datetime):
            out[key] = pa.array([value], pa.timestamp("us", tz="UTC"))
        elif isinstance(value, bool):
            out[key] = pa.array([value], pa.bool_())
        elif isinstance(value, int):
            out[key] = pa.array([value], pa.int64())
        elif isinstance(value, float):
            out[key] = pa.array([value], pa.float64())
        else:
            out[key] = pa.array([None if value is None else str(value)], pa.string())
    return pa.table(out)


def now() -> datetime:
    return datetime.now(UTC)


def timestamps(n: int, at: datetime) -> pa.Array:
    return pa.array(np.full(n, np.datetime64(at.replace(tzinfo=None), "us")), pa.timestamp("us", tz="UTC"))
