"""An upgrade between runs: results, runs and staging tables written by an older version.

A newer version may add columns to the results (typed output, score keys) or to the run
record. A resumed or incremental run must not fail at its last step on such a table, nor put
values into the wrong columns: tables gain the new columns and rows are merged by name, never by
position. A load retried after its commit (the reply lost) writes nothing twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from batchllm import results, warehouse
from batchllm.spec import parse_spec
from tests.faults.harness import query
from tests.product_fixtures import make_reviews_db, spec_dict


def _rows(spec: Any, ids: list[int], run_id: str, label: str) -> pa.Table:
    schema = results.results_schema(pa.int32())
    data: dict[str, list[Any]] = {f.name: [None] * len(ids) for f in schema}
    data.update(
        id=ids,
        prompt_hash=[f"h{i}" for i in ids],
        model=[spec.model] * len(ids),
        params_hash=[spec.params_hash] * len(ids),
        label=[label] * len(ids),
        cached_tokens=[7] * len(ids),
        status=["ok"] * len(ids),
        run_id=[run_id] * len(ids),
        created_at=warehouse.timestamps(len(ids), warehouse.now()).to_pylist(),
    )
    return pa.table(data, schema=schema)


def test_older_tables_take_newer_rows_by_name(tmp_path: Path) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 3)
    spec = parse_spec(spec_dict(db))
    old = _rows(spec, [1, 2], "r0", "old")
    # The older results table: columns in another order, without cached_tokens; the older runs
    # table without the newer run-record fields.
    names = [n for n in reversed(old.column_names) if n != "cached_tokens"]
    con = duckdb.connect(str(db))
    try:
        con.register("old", old.select(names))
        con.execute("CREATE TABLE labels AS SELECT * FROM old")
        con.execute("CREATE TABLE batchllm_runs AS SELECT 'r0' AS run_id, 2 AS rows_ok")
        # An interrupted older run's staging table lacks cached_tokens too.
        con.register("staged", _rows(spec, [3], "r1", "staged").drop_columns(["cached_tokens"]))
        con.execute(f'CREATE TABLE "{warehouse.staging_table(spec)}" AS SELECT * FROM staged')
    finally:
        con.close()

    warehouse.stage(spec, _rows(spec, [2], "r2", "new"))
    assert warehouse.load(spec, {"run_id": "r2", "rows_ok": 2, "recovered_runs": ["r1"]}) == 2
    got = {r[0]: r[1:] for r in query(db, "SELECT id, label, cached_tokens, run_id, status FROM labels")}
    assert got == {1: ("old", None, "r0", "ok"), 2: ("new", 7, "r2", "ok"), 3: ("staged", None, "r1", "ok")}
    assert query(db, "SELECT run_id, rows_ok, recovered_runs FROM batchllm_runs ORDER BY run_id") == [
        ("r0", 2, None),
        ("r2", 2, '["r1"]'),
    ]
    # The same load again (a retry after a commit whose reply was lost): nothing written twice.
    assert warehouse.load(spec, {"run_id": "r2", "rows_ok": 2}) == 0
    assert query(db, "SELECT count(*) FROM batchllm_runs WHERE run_id = 'r2'") == [(1,)]
    assert query(db, "SELECT count(*) FROM labels") == [(3,)]
