"""Reading the warehouse for people: a few rows of a table, one recorded run (`batchllm show`,
`batchllm report`). Read-only: a snapshot or a read-only mount serves them."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from batchllm.spec import SpecError, check_identifier
from batchllm.warehouse import RUNS_MARKS, column_types, connect, sql, table_exists


def show(database: str, table: str, limit: int = 5) -> pa.Table:
    """The first ``limit`` rows of ``table``, ordered by its columns left to right (ids first); of a
    runs table, the latest runs first."""
    with connect(database, read_only=True) as con:
        if not table_exists(con, table):
            raise SpecError(f"table {table!r} does not exist in {database!r}")
        runs = set(RUNS_MARKS) <= set(column_types(con, table))
        return con.sql(
            sql("show_runs" if runs else "show_rows", table=table), params=[limit]
        ).to_arrow_table()


RUN_JSON_COLUMNS = ("timings", "planner", "engine", "recovered_runs", "executor")


def read_run(database: str, run_id: str, runs_table: str = "batchllm_runs") -> dict[str, Any]:
    """One run as recorded by ``load`` (``run_id``: the id or an unambiguous prefix), stats decoded."""
    check_identifier(runs_table, "runs table")
    with connect(database, read_only=True) as con:
        if not table_exists(con, runs_table):
            raise SpecError(f"table {runs_table!r} does not exist in {database!r}")
        found = con.sql(sql("read_run", table=runs_table), params=[run_id]).to_arrow_table().to_pylist()
    if len(found) != 1:
        what = "no run" if not found else "more than one run"
        raise SpecError(f"{what} with id {run_id!r} in {runs_table!r} of {database!r}")
    run = found[0]
    for key in RUN_JSON_COLUMNS:
        if isinstance(run.get(key), str):
            run[key] = json.loads(run[key])
    return run
