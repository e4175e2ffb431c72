"""DuckDB connections that survive other processes and failed writes.

DuckDB lets one process at a time open a database file for writing (readers
too are refused while a writer holds it). ``open_database`` waits for such a
lock with a bounded retry (``BATCHLLM_LOCK_TIMEOUT_S``, default 60 s), then
fails naming the holder. ``transaction`` rolls back on any failure, a signal
included, and reports a failed write (disk full, read-only folder) as a
``WarehouseError`` saying nothing was written. See docs/faults.md.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from batchllm.spec import SpecError

if TYPE_CHECKING:
    from batchllm.spec import JobSpec

LOCK_TIMEOUT_ENV = "BATCHLLM_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 60.0
log = logging.getLogger(__name__)


class WarehouseError(RuntimeError):
    """The warehouse could not be reached (missing, locked, unreadable); often transient."""


def open_database(database: str, read_only: bool = False, wait: bool = True) -> duckdb.DuckDBPyConnection:
    """Open ``database``, retrying while another process holds the file's lock (``wait``, bounded)."""
    deadline: float | None = None
    delay = 0.05
    while True:
        try:
            return duckdb.connect(database, read_only=read_only)
        except duckdb.Error as exc:
            if not _is_lock_error(exc):
                raise WarehouseError(f"database {database!r}: cannot open ({exc})") from None
            now = time.monotonic()
            if deadline is None:
                timeout = lock_timeout() if wait else 0.0
                deadline = now + timeout
                if timeout > 0:
                    log.warning(
                        "database %r is locked by another process; waiting up to %.0fs", database, timeout
                    )
            if now >= deadline:
                raise WarehouseError(
                    f"database {database!r} is locked by another process and stayed locked "
                    f"({_lock_holder(exc)}; waited {lock_timeout() if wait else 0:.0f}s, "
                    f"see {LOCK_TIMEOUT_ENV})"
                ) from None
            time.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, 1.0)


def lock_timeout() -> float:
    """Seconds to wait for another process's lock on the database file (env ``BATCHLLM_LOCK_TIMEOUT_S``)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise WarehouseError(f"{LOCK_TIMEOUT_ENV}: not a number of seconds ({raw!r})") from None


def _is_lock_error(exc: duckdb.Error) -> bool:
    return "Could not set lock on file" in str(exc)


def _lock_holder(exc: duckdb.Error) -> str:
    found = re.search(r"Conflicting lock is held in (.*?)(?:\. See also|$)", str(exc))
    return f"held by {found.group(1)}" if found else str(exc)


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection, what: str, database: str) -> Iterator[None]:
    """BEGIN ... COMMIT; on any failure (a signal too) roll back, and report a failed write
    (disk full, read-only folder) as a WarehouseError that says nothing was written."""
    con.begin()
    try:
        yield
        con.commit()
    except BaseException as exc:
        with suppress(duckdb.Error):  # a failed COMMIT has already ended the transaction
            con.rollback()
        if isinstance(exc, duckdb.Error):
            raise WarehouseError(
                f"database {database!r}: {what} failed, nothing was written ({exc})"
            ) from exc
        raise


def check_writable(spec: JobSpec) -> None:
    """Fail before any model loads when results could not be written (a missing or read-only folder,
    a read-only file): DuckDB writes its write-ahead log next to the database file."""
    path = Path(spec.output_database)
    if not path.parent.is_dir():
        raise SpecError(f"output.database: folder {str(path.parent)!r} does not exist")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
        if path.exists():
            with path.open("r+b"):
                pass
    except OSError as exc:
        raise WarehouseError(
            f"output.database: cannot write to {str(path)!r} ({exc.strerror}); the database file and "
            "its folder must be writable (DuckDB writes a .wal file next to it)"
        ) from None
