"""The `batchllm` command line: run a job, plan it (dry run), show result rows, report a run, answer a batch file.

Spec errors print one line naming the field and exit with status 2; a failed
run exits with status 1; a run stopped by Ctrl-C or SIGTERM exits with 128 +
the signal (130, 143). Failed and stopped runs say what they leave for the
rerun (docs/faults.md). Prefect is imported only by ``run``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from batchllm.spec import SpecError
from batchllm.warehouse import WarehouseError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console(stderr=True)
out = Console()

DEFAULT_DATABASE = "demo/warehouse.duckdb"


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line
    raise typer.Exit(code)


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in {".yaml", ".yml"}


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="job spec (YAML)")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Run a job through the Prefect flow (ephemeral Prefect unless PREFECT_API_URL is set)."""
    # the temporary server's telemetry: offline machines logged an ERROR per run (set it to override)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from batchllm import job as steps
    from batchllm.spec_yaml import load_spec

    received: list[int] = []
    spec: Any = None
    try:
        with _stop_on_signals(received):
            try:
                spec = load_spec(job)
                steps.validate(spec)
            except SpecError as exc:
                _fail(str(exc))
            except WarehouseError as exc:
                _fail(str(exc), code=1)
            try:
                result = run_with_progress(spec, quiet=quiet)
            except SpecError as exc:
                _fail(str(exc))
            except WarehouseError as exc:
                _fail(f"run failed: {exc}{_resume_hint(spec)}", code=1)
            except Exception as exc:
                _fail(f"run failed: {type(exc).__name__}: {exc}{_resume_hint(spec)}", code=1)
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        hint = _resume_hint(spec) if spec is not None else ""
        _fail(f"interrupted by {signal.Signals(signum).name}{hint}", code=128 + signum)
    print_run(result)


@contextmanager
def _stop_on_signals(received: list[int]) -> Iterator[None]:
    """SIGTERM stops a run like Ctrl-C: the exception unwinds (open transactions roll back) and the
    command exits with a message; a second signal during that cleanup is ignored."""

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _resume_hint(spec: Any) -> str:
    """What a failed or stopped run left: the results table changes only in the last step, all at once."""
    from batchllm.warehouse import staged_rows

    staged = staged_rows(spec, wait=False)
    if staged == {}:
        return ""  # nothing finished: there is nothing to resume from
    kept = "" if staged is None else f" ({sum(staged.values())} rows staged)"
    return (
        f"; finished shards are kept{kept} and {spec.output.table!r} is written only by a run's "
        "last step, all at once: rerun the same job to resume"
    )


def run_with_progress(spec: Any, quiet: bool = False) -> dict[str, Any]:
    """Run the enrich flow in this process with a terminal progress bar over the prompts."""
    with console.status("starting Prefect..."):
        from batchllm.flows.enrich import enrich
        from batchllm.flows.ephemeral import start_detached

        start_detached()  # Ctrl-C stops the run, not the temporary server it reports to
    _quiet_expected_errors()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )
    bar = progress.add_task("prompts", total=None)

    def update(done: int, total: int) -> None:
        progress.update(bar, completed=done, total=total)

    with progress:
        return enrich(spec, progress=update)


class _NoTraceback(logging.Formatter):
    """A console formatter that prints an expected failure (a spec error, a locked or full
    warehouse, a stop signal) as its one-line log message: the traceback says nothing more.
    The Prefect server's log handler still gets the whole record."""

    EXPECTED = (SpecError, WarehouseError, KeyboardInterrupt)

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], self.EXPECTED):
            record = copy.copy(record)
            record.exc_info, record.exc_text = None, None
        return self.inner.format(record)


def _quiet_expected_errors() -> None:
    for handler in logging.getLogger().handlers:
        inner = handler.formatter
        if type(handler).__name__ == "PrefectConsoleHandler" and not isinstance(inner, _NoTraceback):
            handler.setFormatter(_NoTraceback(inner or logging.Formatter()))


def print_run(run: dict[str, Any]) -> None:
    table = Table(title=f"run {run['run_id']}", show_header=False)
    for key in (
        "rows_total",
        "rows_skipped",
        "rows_recovered",
        "rows_processed",
        "rows_ok",
        "rows_error",
        "distinct_prompts",
        "prompt_tokens",
        "output_tokens",
        "planned_saving_ratio",
        "achieved_saving_ratio",
        "rows_per_s",
        "tokens_per_s",
    ):
        value = run.get(key)
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    for key, value in run.get("timings", {}).items():
        table.add_row(f"time.{key}", f"{value:.2f}s")
    out.print(table)


@app.command()
def plan(
    path: Annotated[Path, typer.Argument(help="job spec (YAML), or a JSONL/Parquet file of prompts")],
    tokenizer: Annotated[
        str | None, typer.Option(help="model folder or 'default' whose tokenizer encodes a prompt file")
    ] = None,
    block_size: Annotated[
        int | None, typer.Option(help="KV block size used for planning (default: the spec's, or 16)")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="decode tokens per prompt (prompt files)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Dry run: rows, tokens, prefix-sharing saving and estimated cost; no model work, nothing written."""
    if not _is_yaml(path):
        from batchllm.planfile import plan_file_command

        plan_file_command(path, tokenizer, 16 if block_size is None else block_size, max_tokens, as_json)
        return
    from batchllm import job as steps
    from batchllm.spec_yaml import load_spec

    try:
        spec = load_spec(path)
        overrides: dict[str, Any] = {} if block_size is None else {"block_size": block_size}
        if max_tokens is not None:
            overrides["sampling"] = {"max_tokens": max_tokens}
        spec = spec.updated(**overrides)
        with console.status("extracting, rendering and planning..."):
            summary = steps.dry_run(spec)
    except SpecError as exc:
        _fail(str(exc))
    except WarehouseError as exc:  # as `run` reports it: the job is fine, the warehouse is not
        _fail(str(exc), code=1)
    except Exception as exc:
        _fail(f"plan failed: {type(exc).__name__}: {exc}", code=1)
    if as_json:
        print(json.dumps(summary))
        return
    table = Table(title=f"plan for {path.name}", show_header=False)
    for key, value in summary.items():
        if key == "planner" or value is None:  # a job without task.format has no format line
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


@app.command()
def batch(
    input_path: Annotated[Path, typer.Argument(help="OpenAI-style batch file (JSONL of chat requests)")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="output JSONL (rerun: only missing ids run)")
    ],
    model: Annotated[str, typer.Option(help="model folder or 'default'")] = "default",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    max_tokens: Annotated[int, typer.Option(help="max_tokens of requests whose body gives none")] = 256,
) -> None:
    """Answer an OpenAI-style batch file; custom_ids already answered ok in the output are kept, not rerun."""
    from batchllm.batchfile import BatchFileError, run_batch
    from batchllm.models import ModelError

    if not input_path.is_file():
        _fail(f"batch: no such file {str(input_path)!r}")
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        _fail(f"batch: --device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not output.parent.is_dir():
        _fail(f"batch: the output's folder {str(output.parent)!r} does not exist")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail(f"batch: --device {device}, but this machine has no CUDA device")
    if not 1 <= max_tokens <= 32768:
        _fail(f"batch: --max-tokens must be between 1 and 32768, got {max_tokens}")
    try:
        with console.status("running batch requests..."):
            counts = run_batch(input_path, output, model=model, device=device, default_max_tokens=max_tokens)
    except (BatchFileError, ModelError, SpecError) as exc:
        _fail(str(exc))
    except Exception as exc:  # answered lines are on disk already: a rerun does the rest
        _fail(f"batch failed: {type(exc).__name__}: {exc}", code=1)
    out.print(", ".join(f"{k} {v}" for k, v in counts.items()) + f" -> {output}", highlight=False)


@app.command()
def show(
    table: Annotated[
        str, typer.Argument(help="results table name, or a job spec (YAML) to show its output table")
    ],
    database: Annotated[
        str | None, typer.Option("--database", "-d", help=f"DuckDB file (default {DEFAULT_DATABASE})")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=0, help="rows to show")] = 5,
    all_columns: Annotated[
        bool, typer.Option("--all", help="every column (default: the useful ones)")
    ] = False,
) -> None:
    """Print a few rows of a table (for a results table: id, status and what the model produced)."""
    from batchllm import browse
    from batchllm.spec_yaml import load_spec
    from batchllm.table_view import cell, useful_columns

    try:
        if _is_yaml(Path(table)):
            spec = load_spec(table)
            table, database = spec.output.table, database or spec.output_database
        database = database or DEFAULT_DATABASE
        if database != ":memory:" and not Path(database).exists():
            _fail(f"database {database!r} does not exist")
        rows = browse.show(database, table, limit)
    except (SpecError, WarehouseError, ValueError) as exc:
        _fail(str(exc))
    names = rows.column_names if all_columns else useful_columns(rows)
    grid = Table(title=f"{table} ({database})")
    for name in names:
        grid.add_column(name, overflow="fold", max_width=60)
    for row in rows.to_pylist():
        grid.add_row(*(cell(row[name]) for name in names))
    out.print(grid)


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="run id (or a unique prefix), as `batchllm run` prints it")],
    database: Annotated[
        str | None, typer.Option("--database", "-d", help=f"DuckDB file (default {DEFAULT_DATABASE})")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="HTML file, or .png for the chart alone")
    ] = None,
    runs_table: Annotated[str, typer.Option(help="the runs table")] = "batchllm_runs",
) -> None:
    """Write a recorded run's report (the flow's markdown report, chart and stats table) as HTML or PNG."""
    import duckdb

    from batchllm import browse
    from batchllm import report as reports
    from batchllm.chart import chart_png

    database = database or DEFAULT_DATABASE
    if not Path(database).exists():
        _fail(f"database {database!r} does not exist")
    if output is not None and (not output.parent.is_dir() or output.suffix.lower() not in (".html", ".png")):
        _fail(f"report: --output must be an .html or .png file in a folder that exists, got {str(output)!r}")
    try:
        run = browse.read_run(database, run_id, runs_table)
    except (SpecError, WarehouseError, ValueError) as exc:  # ValueError: an unsafe --runs-table name
        _fail(str(exc))
    except duckdb.Error as exc:  # a table that is not a runs table
        _fail(f"report: {runs_table!r} is not a runs table ({type(exc).__name__}: {exc})")
    output = output or Path(f"run-{run['run_id']}.html")
    if output.suffix.lower() == ".png":
        png = chart_png(run)
        if png is None:
            _fail(f"run {run['run_id']} has no metrics over time (no step of it recorded any)")
        output.write_bytes(png)
    else:
        output.write_text(reports.html_report(run, run.get("table") or "?"), encoding="utf-8")
    out.print(f"run {run['run_id']} -> {output}", highlight=False)


def main() -> None:
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
