"""kill -9, SIGTERM and Ctrl-C at exact points of a real `batchllm run`, then reruns.

Each run is a real process on a real DuckDB file, paused at a named point
(batchllm.faults) so the signal lands exactly there: mid-inference, inside
the staging transaction, between the MERGE and its COMMIT. After every stop
the results table is as before and staging holds whole finished shards only;
after the rerun every source id is there once and no finished shard was
computed twice (the shards' own log lines count the model work).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.faults.harness import Job, Run, no_traceback, runs, seed_results, staged

pytestmark = pytest.mark.slow

ROWS = 24
SEED_IDS = [1000, 1001, 1002]  # results of an earlier job: no run may touch them


def finished_shards(run: Run) -> list[int]:
    """Sizes of the shards a run finished (its log lines): the model work that counted."""
    return [int(n) for n in re.findall(r"shard done: (\d+) rows ok, \d+ errors", run.stderr)]


def check_untouched(job: Job, before: list[tuple]) -> None:
    assert job.results() == before, "the results table changed"
    assert runs(job.db) == [], "a stopped run was recorded"


def check_complete(job: Job, before: list[tuple], rows: int = ROWS) -> None:
    ids = job.ids()
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert ids == list(range(rows)) + SEED_IDS, "lost ids"
    assert [r for r in job.results() if r[0] in SEED_IDS] == before
    assert staged(job.db) == []


def stop(run: Run, sig: int) -> int:
    run.wait_paused()
    return run.signal(sig)


def test_kill9_mid_inference_mid_staging_mid_merge_then_resume(make_job) -> None:
    job = make_job()
    seed_results(job.db, "labels", SEED_IDS)
    before = job.results()

    # 1. kill -9 mid-inference: the second shard's engine is running, the first shard is staged.
    run1 = job.start(pause_at="infer:2")
    assert stop(run1, signal.SIGKILL) == -signal.SIGKILL
    check_untouched(job, before)
    staged1 = staged(job.db)
    assert len(staged1) == sum(finished_shards(run1)) > 0
    assert len({i for i, _ in staged1}) == len(staged1)

    # 2. kill -9 inside the second staging transaction (rows inserted, not committed).
    run2 = job.start(pause_at="stage:2")
    assert stop(run2, signal.SIGKILL) == -signal.SIGKILL
    check_untouched(job, before)
    staged2 = staged(job.db)
    done2 = finished_shards(run2)
    assert f"{len(staged1)} recovered" in run2.stderr
    assert len(done2) == 2, "the second shard finished inference, its staging never committed"
    assert set(staged1) <= set(staged2) and len(staged2) == len(staged1) + done2[0]

    # 3. kill -9 between the MERGE (and the staging drop) and their COMMIT.
    run3 = job.start(pause_at="load:1")
    assert stop(run3, signal.SIGKILL) == -signal.SIGKILL
    check_untouched(job, before)
    staged3 = staged(job.db)
    assert sorted(i for i, _ in staged3) == list(range(ROWS)), "every row staged, once"
    assert sum(finished_shards(run1)) + done2[0] + sum(finished_shards(run3)) == ROWS, (
        "a finished shard was computed twice"
    )

    # 4. The rerun finishes from staging alone: no model loads, every id once.
    run4 = job.run()
    check_complete(job, before)
    (record,) = runs(job.db)
    assert record["rows_recovered"] == ROWS and record["rows_processed"] == 0
    assert json.loads(record["engine"]) == [] and finished_shards(run4) == []
    recovered = {r for _, r in staged3}
    assert set(json.loads(record["recovered_runs"])) == recovered and len(recovered) == 3
    assert {
        r["run_id"] for i, r in job.rows().items() if i not in SEED_IDS
    } == recovered  # rows keep their run


def test_sigterm_then_ctrl_c_stop_cleanly_and_resume(make_job) -> None:
    job = make_job()
    seed_results(job.db, "labels", SEED_IDS)
    before = job.results()
    work = 0
    for sig, point in ((signal.SIGTERM, "infer:2"), (signal.SIGINT, "load:1")):
        run = job.start(pause_at=point)
        code = stop(run, sig)
        err = " ".join(run.stderr.split())
        assert code == 128 + sig, run.stderr[-3000:]
        assert f"error: interrupted by {signal.Signals(sig).name}" in err, err[-2000:]
        assert "rerun the same job to resume" in err and no_traceback(run.stderr), run.stderr[-3000:]
        check_untouched(job, before)
        work += sum(finished_shards(run))
        kept = len(staged(job.db))
        assert kept == work > 0 and f"({kept} rows staged)" in err, err[-2000:]
    assert kept == ROWS  # stopped at the load: everything was staged
    job.run()
    check_complete(job, before)
    (record,) = runs(job.db)
    assert record["rows_recovered"] == ROWS and record["rows_processed"] == 0


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (from /proc: the parent pid is the 4th field of stat)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_without_a_server_ctrl_c_in_a_terminal_and_kill9_leave_no_server(make_job) -> None:
    """Without PREFECT_API_URL the run starts Prefect's temporary server: Ctrl-C in a terminal
    (SIGINT to the whole process group) must stop the run cleanly, not the server under it, and
    neither that nor kill -9 of the run may leave the server behind."""
    job = make_job(rows=4, shards=1)
    job.env = {k: v for k, v in job.env.items() if k != "PREFECT_API_URL"}
    for sig in (signal.SIGINT, signal.SIGKILL):
        run = job.start(pause_at="infer:1")
        run.wait_paused()
        servers = _children(run.proc.pid)
        assert servers, "no temporary server was started"
        if sig == signal.SIGINT:
            os.killpg(run.proc.pid, sig)  # what a terminal's Ctrl-C does
        else:
            run.proc.kill()  # the run alone, as the OOM killer does
        code = run.wait(timeout=120)
        assert _gone(servers), "the temporary server outlived the run"
        if sig == signal.SIGINT:
            err = " ".join(run.stderr.split())
            assert code == 130 and "error: interrupted by SIGINT" in err, run.stderr[-3000:]
            assert no_traceback(run.stderr) and "Connect" not in err, run.stderr[-3000:]
    assert job.results() == [] and runs(job.db) == []
