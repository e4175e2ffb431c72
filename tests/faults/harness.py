"""Real `batchllm run` processes on real DuckDB files, stopped at named points (batchllm.faults).

A job folder holds the warehouse (``w.duckdb``), the spec (``job.yaml``) and each
run's stdout/stderr, copied from pipes into files by threads (a paused process
never blocks on a full pipe). Runs share one Prefect server started for the
fault suite, so a run costs its own work plus imports, not a temporary server
each. Each run is a process group of its own, killed whole when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import yaml

from tests.product_fixtures import make_reviews_db, spec_dict

BIN = Path(sys.executable).parent / "batchllm"
STAGING_LIKE = "batchllm_staging_%"


def query(db: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """Read with a fresh read-write connection (read-only would refuse a database that still has a WAL)."""
    con = duckdb.connect(str(db))
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def staged(db: Path) -> list[tuple[Any, str]]:
    """(id, run_id) of every row in any staging table of ``db``."""
    names = [
        r[0]
        for r in query(db, "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE ?", [STAGING_LIKE])
    ]
    return [row for n in names for row in query(db, f'SELECT id, run_id FROM "{n}"')]


def table_rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    """Every row of ``table`` ordered by id ([] when it does not exist)."""
    exists = query(db, "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table])[0][0]
    return query(db, f'SELECT * FROM "{table}" ORDER BY id') if exists else []


def runs(db: Path, table: str = "batchllm_runs") -> list[dict[str, Any]]:
    """The runs table as dicts, oldest first."""
    con = duckdb.connect(str(db))
    try:
        found = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table]).fetchall()
        if not found[0][0]:
            return []
        return con.sql(f'SELECT * FROM "{table}" ORDER BY finished_at').to_arrow_table().to_pylist()
    finally:
        con.close()


def seed_results(db: Path, table: str, ids: list[int]) -> None:
    """Results of an earlier job (ids outside the test job) that no run of the test may touch."""
    from batchllm.results import results_schema

    schema = results_schema(pa.int32())
    rows = {f.name: [None] * len(ids) for f in schema}
    rows.update(id=ids, status=["ok"] * len(ids), label=["earlier"] * len(ids), run_id=["seed"] * len(ids))
    con = duckdb.connect(str(db))
    try:
        con.register("seed", pa.table(rows, schema=schema))
        con.execute(f'CREATE TABLE "{table}" AS SELECT * FROM seed')
    finally:
        con.close()


@dataclass
class Run:
    """One `batchllm run` process; its output goes to files in the job folder."""

    proc: subprocess.Popen
    marker: Path
    out: Path
    err: Path
    copiers: list[threading.Thread] = field(default_factory=list)
    returncode: int | None = None

    def wait_paused(self, timeout: float = 300) -> str:
        """Wait until the process pauses at its point; returns what it wrote ("point n pid")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.marker.exists() and (text := self.marker.read_text()).strip():
                return text.strip()
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"run exited ({self.proc.returncode}) before pausing:\n{self.stderr[-4000:]}"
                )
            time.sleep(0.05)
        raise AssertionError(f"run did not pause within {timeout}s:\n{self.stderr[-4000:]}")

    def resume(self) -> None:
        self.marker.unlink()

    def signal(self, sig: int) -> int:
        """Send ``sig`` and wait for the process to end; returns its exit code."""
        self.proc.send_signal(sig)
        return self.wait(timeout=120)

    def wait(self, timeout: float = 600) -> int:
        """Wait for the run to exit, then kill anything left in its process group."""
        deadline = time.monotonic() + timeout
        # Wait without reaping: until reaped, the run's pid (its group's id) cannot be reused,
        # so the group kill below cannot reach an unrelated process.
        while self.proc.returncode is None and not self._exited():
            if time.monotonic() > deadline:
                self.cleanup()
                raise subprocess.TimeoutExpired(self.proc.args, timeout)
            time.sleep(0.05)
        self.cleanup()
        self.returncode = self.proc.returncode
        return self.returncode

    def _exited(self) -> bool:
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
        except ChildProcessError:  # reaped already (by poll)
            return True

    def cleanup(self) -> None:
        """Kill whatever the run left in its process group (nothing, normally), then reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for thread in self.copiers:
            thread.join(timeout=30)

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


@dataclass
class Job:
    """A job folder: a reviews warehouse, a classify spec over it, and the env of its runs."""

    folder: Path
    env: dict[str, str]
    spec: dict[str, Any] = field(default_factory=dict)
    name: str = "job"
    runs_started: int = 0

    @classmethod
    def create(cls, folder: Path, env: dict[str, str], rows: int = 24, **over: Any) -> Job:
        folder.mkdir(parents=True, exist_ok=True)
        make_reviews_db(folder / "w.duckdb", rows)
        spec = spec_dict("w.duckdb", **{"shards": 2, "sampling": {"max_tokens": 2}, **over})
        job = cls(folder=folder, env=env, spec=spec)
        job.write_spec()
        return job

    @property
    def db(self) -> Path:
        return self.folder / "w.duckdb"

    @property
    def path(self) -> Path:
        return self.folder / f"{self.name}.yaml"

    def sibling(self, name: str, **over: Any) -> Job:
        """Another job (its own spec, ``over`` applied) on the same warehouse."""
        job = Job(folder=self.folder, env=self.env, spec={**self.spec, **over}, name=name)
        job.write_spec()
        return job

    def write_spec(self, **over: Any) -> None:
        self.spec.update(over)
        self.path.write_text(yaml.safe_dump(self.spec))

    def start(
        self,
        pause_at: str | None = None,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> Run:
        """Start `batchllm run job.yaml`; with ``pause_at`` ("point:n") it pauses there (see batchllm.faults)."""
        self.runs_started += 1
        k = self.runs_started
        marker = self.folder / f"{self.name}-paused-{k}"
        run_env = {**self.env, "BATCHLLM_PAUSE_FILE": str(marker), **(env or {})}
        if pause_at:
            run_env["BATCHLLM_PAUSE_AT"] = pause_at
        out, err = self.folder / f"{self.name}-{k}.out", self.folder / f"{self.name}-{k}.err"
        proc = subprocess.Popen(
            [*(prefix or []), str(BIN), "run", "--quiet", str(self.path)],
            cwd=self.folder,
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: cleanup kills all of it
        )
        # Pipes drained into files by threads: a paused run never blocks on a full pipe, and a
        # file-size limit set on the run (disk-full tests) does not cut its own messages short.
        copiers = [_drain(proc.stdout, out), _drain(proc.stderr, err)]
        return Run(proc=proc, marker=marker, out=out, err=err, copiers=copiers)

    def run(self, **kwargs: Any) -> Run:
        """Run to the end; fails the test with the run's stderr when it does not exit 0."""
        run = self.start(**kwargs)
        code = run.wait()
        assert code == 0, f"run exited {code}:\n{run.stderr[-4000:]}"
        return run

    def results(self, table: str = "labels") -> list[tuple[Any, ...]]:
        return table_rows(self.db, table)

    def rows(self, table: str = "labels") -> dict[Any, dict[str, Any]]:
        """Result rows by id, as dicts (column positions may change, names do not)."""
        con = duckdb.connect(str(self.db))
        try:
            rows = con.sql(f'SELECT * FROM "{table}" ORDER BY id').to_arrow_table().to_pylist()
        finally:
            con.close()
        return {r["id"]: r for r in rows}

    def ids(self, table: str = "labels") -> list[Any]:
        """Result ids, one per row (duplicates kept, so a test can see them)."""
        return [r[0] for r in query(self.db, f'SELECT id FROM "{table}" ORDER BY id')]


def _drain(stream: Any, path: Path) -> threading.Thread:
    f = path.open("wb")  # exists (empty) before the run writes anything

    def copy() -> None:
        with f:
            while chunk := stream.read1(65536):
                f.write(chunk)
                f.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def no_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" not in text
