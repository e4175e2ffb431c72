"""Concurrent runs on one results table: three `batchllm run` processes at once.

DuckDB lets one process at a time open a file for writing. Run A is paused
inside its load transaction (it holds the lock), then run B (an overlapping
job) and run C (the same job as A) start and must wait for the lock, bounded,
instead of failing; A is let go, and all three finish. No id twice, none
lost, each row written by a run that covered it, one runs-table row per run.
"""

from __future__ import annotations

import time

import pytest

from batchllm.spec_yaml import load_spec
from tests.faults.harness import runs, staged

pytestmark = pytest.mark.slow

QUERY = "SELECT id, plot, review FROM reviews WHERE id {} ORDER BY id"


def test_overlapping_and_identical_jobs_at_once(make_job) -> None:
    a = make_job(rows=24, shards=1, source={"database": "w.duckdb", "query": QUERY.format("< 16")})
    b = a.sibling("b", source={"database": "w.duckdb", "query": QUERY.format(">= 8")})
    c = a.sibling("c")  # the same spec as A: it shares A's staging table
    wait = {"BATCHLLM_LOCK_TIMEOUT_S": "300"}

    run_a = a.start(pause_at="load:1", env=wait)
    run_a.wait_paused()  # A holds the write lock, its MERGE done and not committed
    run_b, run_c = b.start(env=wait), c.start(env=wait)
    deadline = time.monotonic() + 120
    while not all("is locked by another process; waiting" in r.stderr for r in (run_b, run_c)):
        assert time.monotonic() < deadline, run_b.stderr[-2000:] + run_c.stderr[-2000:]
        assert run_b.proc.poll() is None and run_c.proc.poll() is None, run_b.stderr + run_c.stderr
        time.sleep(0.2)
    time.sleep(1.0)
    run_a.resume()
    codes = [r.wait() for r in (run_a, run_b, run_c)]
    assert codes == [0, 0, 0], "\n".join(r.stderr[-2000:] for r in (run_a, run_b, run_c))

    rows = a.rows()
    ids = a.ids()
    assert len(ids) == len(set(ids)) and ids == list(range(24)), "duplicated or lost ids"
    assert all(r["status"] == "ok" for r in rows.values())
    records = runs(a.db)
    assert len(records) == 3 and len({r["run_id"] for r in records}) == 3
    covers = {load_spec(a.path).spec_hash: range(16), load_spec(b.path).spec_hash: range(8, 24)}
    covered = {r["run_id"]: covers[r["spec_hash"]] for r in records}
    for i, row in rows.items():
        assert i in covered[row["run_id"]], f"id {i} written by a run that did not cover it"
    assert staged(a.db) == []
