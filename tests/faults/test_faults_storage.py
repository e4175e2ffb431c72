"""The warehouse locked by another process, a read-only output folder, a full disk.

Each with a real `batchllm run` process: a clear one-line error and exit 1, no
traceback, the results table exactly as before, finished shards kept in
staging, and a rerun (once the fault is gone) that completes from them.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.harness import Job, Run, no_traceback, runs, seed_results, staged
from tests.faults.test_faults_kill import ROWS, SEED_IDS, check_complete, check_untouched, finished_shards

pytestmark = pytest.mark.slow

HOLD = """
import duckdb, pathlib, sys, time
con = duckdb.connect(sys.argv[1])
pathlib.Path(sys.argv[2]).touch()
time.sleep(600)
"""


def hold_lock(job: Job) -> subprocess.Popen:
    """Another process that opens the warehouse for writing and keeps it open."""
    ready = job.folder / "lock-held"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(job.db), str(ready)], start_new_session=True)
    while not ready.exists():
        assert proc.poll() is None, "the lock holder died"
    return proc


def release(holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait()


def message(run: Run) -> str:
    return " ".join(run.stderr.split())


def test_warehouse_locked_at_start_fails_fast_and_clearly(make_job) -> None:
    job = make_job(rows=6)
    holder = hold_lock(job)
    try:
        run = job.start(env={"BATCHLLM_LOCK_TIMEOUT_S": "2"})
        assert run.wait(timeout=300) == 1, run.stderr[-3000:]
    finally:
        release(holder)
    err = message(run)
    assert "is locked by another process and stayed locked" in err and "held by" in err, err
    assert "BATCHLLM_LOCK_TIMEOUT_S" in err and no_traceback(run.stderr), run.stderr[-3000:]
    assert job.results() == [] and runs(job.db) == []


def test_warehouse_locked_mid_run_fails_keeping_finished_shards(make_job) -> None:
    """The lock outlasts the bounded wait and Prefect's retries of the stage task: the run fails
    clearly; the first shard stays staged and the rerun, the lock gone, recovers it."""
    job = make_job()
    seed_results(job.db, "labels", SEED_IDS)
    before = job.results()
    run = job.start(pause_at="infer:2", env={"BATCHLLM_LOCK_TIMEOUT_S": "2"})
    run.wait_paused()  # shard 1 staged, shard 2 running, no connection open
    holder = hold_lock(job)
    try:
        run.resume()
        assert run.wait() == 1, run.stderr[-3000:]
    finally:
        release(holder)
    err = message(run)
    assert "run failed: database" in err and "is locked by another process" in err, err[-3000:]
    assert "rerun the same job to resume" in err and no_traceback(run.stderr), run.stderr[-3000:]
    check_untouched(job, before)
    kept = staged(job.db)
    assert len(kept) == finished_shards(run)[0] > 0  # the first shard only: the second was never staged
    assert len({i for i, _ in kept}) == len(kept)
    rerun = job.run()
    check_complete(job, before)
    (record,) = runs(job.db)
    assert record["rows_recovered"] == len(kept) and sum(finished_shards(rerun)) == ROWS - len(kept)


def _no_write_prefix() -> list[str]:
    """A command prefix under which permission bits bind (root ignores them unless it drops the
    capabilities that bypass them)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be enforced")
    caps = "-dac_override,-dac_read_search,-fowner"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.mark.parametrize("where", ["same file", "separate output database"])
def test_read_only_output_folder_fails_before_the_model_loads(make_job, where: str) -> None:
    job = make_job(rows=6)
    out = job.folder
    if where == "separate output database":
        out = job.folder / "out"
        out.mkdir()
        job.write_spec(output={"table": "labels", "database": "out/results.duckdb"})
    before = sorted(p.name for p in out.glob("*.duckdb*"))
    out.chmod(0o555)
    try:
        run = job.start(prefix=_no_write_prefix())
        code = run.wait(timeout=300)
    finally:
        out.chmod(0o755)
    err = message(run)
    assert code == 1, run.stderr[-3000:]
    assert "output.database: cannot write to" in err and "Permission denied" in err, err[-3000:]
    assert no_traceback(run.stderr) and "shard:" not in err, run.stderr[-3000:]  # no model work
    assert sorted(p.name for p in out.glob("*.duckdb*")) == before
    assert job.results() == [] and runs(job.db) == []


def _disk_full(run: Run) -> None:
    """From now on the paused run can write no file byte (RLIMIT_FSIZE of 1 byte: every write fails
    with EFBIG, as on a full disk); its pipes are not files, so its messages still come through."""
    resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))


def test_disk_full_while_staging_and_while_merging(make_job) -> None:
    job = make_job()
    seed_results(job.db, "labels", SEED_IDS)
    before = job.results()
    work = 0
    for point in ("stage:2", "load:1"):
        run = job.start(pause_at=point)
        run.wait_paused()
        _disk_full(run)
        run.resume()
        assert run.wait() == 1, run.stderr[-3000:]
        err = message(run)
        what = "staging results" if point.startswith("stage") else "loading the results"
        assert f"{what} failed, nothing was written" in err and "File too large" in err, err[-3000:]
        assert "rerun the same job to resume" in err and no_traceback(run.stderr), run.stderr[-3000:]
        check_untouched(job, before)
        work += finished_shards(run)[0] if point.startswith("stage") else sum(finished_shards(run))
        kept = staged(job.db)
        assert len(kept) == work and len({i for i, _ in kept}) == work, ("whole shards only", kept)
    assert work == ROWS, (work, kept, run.stderr[-6000:])  # the load failed after every shard was staged
    job.run()
    check_complete(job, before)
    (record,) = runs(job.db)
    assert record["rows_recovered"] == ROWS and record["rows_processed"] == 0


def test_duckdb_on_a_full_disk_keeps_committed_data_only(tmp_path: Path) -> None:
    """DuckDB's own behaviour the suite relies on: a commit whose WAL write fails leaves the file
    as it was; a commit that reached the WAL but whose checkpoint failed is replayed by the next
    connection (so a run that failed after its commit lost nothing)."""
    import duckdb

    db = tmp_path / "d.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE t AS SELECT range AS id FROM range(10)")
    con.close()
    code = f"""
import duckdb, os, resource
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
con = duckdb.connect({str(db)!r})
try:
    con.execute("INSERT INTO t SELECT range + 10 FROM range(100000)")
    raise SystemExit("the big insert should not fit")
except duckdb.Error as exc:
    print("big:", type(exc).__name__, exc)
con.close()
con = duckdb.connect({str(db)!r})
con.execute("INSERT INTO t VALUES (-1), (-2)")  # a small commit: its WAL fits under the limit
try:
    con.execute("CHECKPOINT")
    raise SystemExit("the checkpoint should not fit")
except duckdb.Error as exc:
    print("checkpoint:", type(exc).__name__, exc)
con.close()
print("wal left:", os.path.exists({str(db) + ".wal"!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "big:" in out.stdout and "checkpoint:" in out.stdout, out.stdout
    assert "File too large" in out.stdout and "wal left: True" in out.stdout, out.stdout
    con = duckdb.connect(str(db))  # replays the WAL the failed checkpoint left
    try:
        assert con.execute("SELECT count(*), min(id), max(id) FROM t").fetchall() == [(12, -2, 9)]
    finally:
        con.close()
