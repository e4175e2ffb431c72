"""The output tables a run will write, checked before any model work: their schemas exist, and a
results table already there takes the run's rows (it is one, and its columns take the run's types).

Kept apart from the I/O (warehouse.py): this reads the database's catalog only.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import duckdb
import pyarrow as pa

from batchllm import typed, warehouse
from batchllm.spec import JobSpec, SpecError

RESULTS_MARKS = ("id", "prompt_hash", "status", "run_id")  # columns every results table has


def check_output(spec: JobSpec, schema: pa.Schema) -> None:
    """Before any model work: the output tables' schemas exist, and a results table already there is
    a table of results whose columns take this run's values (``schema``).

    Raises SpecError naming the field to change. A table that is not a results table (the source
    table itself, say) would be overwritten, a view cannot be written; a column whose type the run's
    does not cast to implicitly would be cast at the last step (DOUBLE ids rounded into an INTEGER
    column collide) or fail it after all the inference.
    """
    table, database = spec.output.table, spec.output_database
    tables = (("output.table", table), ("output.runs_table", spec.output.runs_table))
    with warehouse.connect(database) if Path(database).exists() else nullcontext() as con:
        for field, name in tables:
            where = warehouse.split_table(name)[0]
            if where != "main" and (
                con is None or not warehouse.scalar(con, warehouse.sql("schema_exists"), [where])
            ):
                raise SpecError(
                    f"{field}: schema {where!r} does not exist in {database!r} "
                    f"(CREATE SCHEMA {where}, or name a table in main)"
                )
        if con is None:
            return
        for field, name in tables:
            if warehouse.scalar(con, warehouse.sql("view_exists"), list(warehouse.split_table(name))):
                raise SpecError(f"{field}: {name!r} is a view; name a table")
        _check_runs_table(con, spec.output.runs_table)
        if not warehouse.table_exists(con, table):
            return
        have = warehouse.column_types(con, table)
        if missing := [c for c in RESULTS_MARKS if c not in have]:
            raise SpecError(
                f"output.table: {table!r} exists and is not a results table (no {', '.join(missing)} "
                "column); name another table"
            )
        if spec.output.mode == "replace":  # the table is rewritten from this run's rows
            return
        batch = warehouse.register(con, schema.empty_table())
        for key, (name, dtype) in warehouse.column_types(con, batch).items():
            if key not in have or have[key][1] == dtype:
                continue
            if warehouse.scalar(
                con, warehouse.sql("casts_implicitly", column=name, batch=batch, table=table)
            ):
                continue  # a wider id, struct fields in another order: the merge casts them safely
            old_name, old_type = have[key]
            raise SpecError(
                f"{_field_of(spec, key)}: the results table {table!r} has {old_name} {old_type} where "
                f"this run writes {name} {dtype}; cast it in the query or format, write to another "
                "output.table, or set output.mode: replace"
            )


def _check_runs_table(con: duckdb.DuckDBPyConnection, runs: str) -> None:
    """A runs table already there is one (a results or source table would take the run's record:
    widened with its columns, a row of NULLs added)."""
    if not warehouse.table_exists(con, runs):
        return
    have = warehouse.column_types(con, runs)
    if "run_id" not in have or "prompt_hash" in have:  # a source table, or a results table
        raise SpecError(f"output.runs_table: {runs!r} exists and is not a runs table; name another table")


def _field_of(spec: JobSpec, column: str) -> str:
    """The spec field that decides a results column's type."""
    if column == "id":
        return "source.id_column"
    if column in ("query_key", "candidate_key"):
        return f"task.{column}"
    fmt = spec.task.format
    if fmt is not None and column in {f.name.lower() for f in typed.typed_fields(fmt)}:
        return "task.format"
    return "output.table"
