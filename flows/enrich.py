"""The `enrich` flow: SQL rows in, a results table out.

extract -> prepare (render + tokenize) -> plan -> infer (one task per shard,
the engine created inside it) -> stage -> load -> report. Each task wraps one
batchllm call; retries sit on the warehouse I/O; inference holds a slot of the
global concurrency limit named for its device ("gpu" or "cpu") when that limit
exists. With ``executor.kind: ray`` the shards run on engine actors of a Ray
cluster instead (ray_shards.py), several at once, each staged as it finishes.
Runs in Prefect's ephemeral mode without a server, or against one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from batchllm.flows import ray_shards
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from batchllm import job, report, results, warehouse
from batchllm.backends.base import GroupSpec, Progress
from batchllm.connection import check_writable
from batchllm.distributed import cluster as ray_cluster
from batchllm.faults import pause_point
from batchllm.spec import JobSpec, SpecError
from batchllm.spec_yaml import load_spec


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O failures, not a spec that cannot work (retrying it changes nothing)."""
    return not isinstance(state.data, SpecError)


@task(retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=_transient, cache_policy=NO_CACHE)
def extract(spec: JobSpec) -> pa.Table:
    """Run the job's query into Arrow (validates columns and ids first)."""
    return warehouse.extract(spec)


@task(cache_policy=NO_CACHE)
def prepare(spec: JobSpec, table: pa.Table) -> job.Prepared:
    """Render and hash prompts, skip rows already done, dedup, tokenize."""
    return job.prepare(spec, table)


@task(cache_policy=NO_CACHE)
def plan(spec: JobSpec, prepared: job.Prepared, shards: int | None = None) -> job.PlanInfo:
    """Group prompts by shared prefix and cut the plan into shards of whole groups."""
    return job.plan(spec, prepared, shards)


@task(cache_policy=NO_CACHE)
def infer(
    spec: JobSpec,
    prepared: job.Prepared,
    indices: list[int],
    groups: list[GroupSpec] | None,
    done_before: int,
    total: int,
    progress_id: Any,
    device: str,
    limit: str | None,
    progress: Progress | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Run one shard on the job's device; returns its result rows and engine stats."""
    logger = get_run_logger()
    reporter = _Progress(progress_id, done_before, total, progress)
    token_ids = [prepared.prompts.token_ids[i] for i in indices]
    if limit:
        logger.info(
            "shard: %d prompts on %s, holding a slot of concurrency limit %r", len(indices), device, limit
        )
    else:
        logger.info("shard: %d prompts on %s (no concurrency limit for this device)", len(indices), device)
    with concurrency(limit, occupy=1) if limit else nullcontext():
        outcomes, stats = job.infer_shard(spec, token_ids, progress=reporter, groups=groups)
    reporter.finish(len(indices))
    rows = results.result_rows(spec, prepared, indices, outcomes)
    ok, errors = results.count_status(rows)
    logger.info("shard done: %d rows ok, %d errors, %.1fs", ok, errors, stats.get("run_s", 0.0))
    return rows, stats


@task(retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def stage(spec: JobSpec, rows: pa.Table) -> int:
    """Append result rows to the job's staging table (durable before the merge)."""
    return warehouse.stage(spec, rows)


@task(retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def load(spec: JobSpec, run: dict[str, Any]) -> int:
    """Merge staging into the results table and record the run, in one transaction."""
    return warehouse.load(spec, run)


@task(name="report", cache_policy=NO_CACHE)
def publish_report(spec: JobSpec, run: dict[str, Any]) -> None:
    """Publish the run's statistics as markdown and table artifacts."""
    key = _artifact_key(spec)
    create_markdown_artifact(
        markdown=report.markdown_report(run, spec.output.table, chart=True),
        key=f"{key}-report",
        description="run statistics",
    )
    create_table_artifact(table=report.stats_table(run), key=f"{key}-stats", description="run statistics")


@flow(name="enrich", log_prints=True)
def enrich(spec: JobSpec | str, progress: Progress | None = None) -> dict[str, Any]:
    """Enrich the rows of a SQL query with LLM outputs into a results table.

    ``progress(done, total)`` is called as prompts finish (the CLI's progress
    bar); the Prefect progress artifact follows the same counts.
    """
    spec = load_spec(spec) if isinstance(spec, str | Path) else spec
    job.check(spec)
    check_writable(spec)  # a read-only folder fails here, not after inference
    with ExitStack() as stack:
        cluster = None
        if spec.executor.kind == "ray":  # joined first: a cluster that cannot run the job fails early
            cluster = ray_shards.join(spec)
            stack.callback(ray_cluster.close, cluster)
        return _enrich(spec, progress, cluster)


def _enrich(spec: JobSpec, progress: Progress | None, cluster: ray_cluster.Cluster | None) -> dict[str, Any]:
    """The flow's steps, inference on the Ray ``cluster`` when there is one."""
    logger = get_run_logger()
    timings: dict[str, float] = {}
    with _timed(timings, "extract_s"):
        table = extract(spec)
    with _timed(timings, "prepare_s"):
        prepared = prepare(spec, table)
    with _timed(timings, "plan_s"):  # on Ray, at least one shard per actor
        plan_info = plan(spec, prepared, max(spec.shards, cluster.actors) if cluster else None)
    logger.info(
        "%d rows read, %d skipped (done), %d recovered from an interrupted run, %d to run (%d distinct prompts)",
        prepared.rows_total,
        prepared.rows_skipped,
        prepared.rows_recovered,
        prepared.prompts.num_rows,
        prepared.prompts.num_prompts,
    )
    recovered_runs = sorted(warehouse.staged_rows(spec) or {}) if prepared.rows_recovered else []
    if recovered_runs:
        logger.info("recovering staged rows of interrupted run(s) %s", ", ".join(recovered_runs))
    counts = {"rows_processed": 0, "rows_ok": 0, "rows_error": 0}
    errors = results.error_rows(spec, prepared)
    if errors.num_rows:
        _stage_counted(spec, counts, errors)
        logger.warning("%d rows failed before inference, e.g. %s", errors.num_rows, errors.column("error")[0])
    executor: dict[str, Any] = {"kind": "local"}
    with _timed(timings, "infer_s"):
        if cluster is None:
            engine_stats = _infer_shards(spec, prepared, plan_info, counts, progress)
        else:
            engine_stats, executor = ray_shards.infer_on_ray(
                spec,
                prepared,
                plan_info,
                cluster,
                progress,
                _artifact_key(spec),
                partial(_stage_counted, spec, counts),
            )
    device = (cluster.device if cluster else job.device_name(spec)) if plan_info.shards else "none"
    run = report.run_record(spec, prepared, plan_info, engine_stats, counts, timings, device)
    run["recovered_runs"] = recovered_runs  # the runs table says whose work this run finished
    run["executor"] = executor
    run["rows_written"] = load(spec, run)  # it records the load's time in the run (load_s)
    try:  # the run is committed: an artifact that cannot be written does not fail it
        publish_report(spec, run)
    except Exception as exc:
        logger.warning(
            "the report artifacts could not be published (%s: %s); the run is recorded",
            type(exc).__name__,
            exc,
        )
    logger.info(report.markdown_report(run, spec.output.table))
    return _jsonable(run)


def _infer_shards(
    spec: JobSpec,
    prepared: job.Prepared,
    plan_info: job.PlanInfo,
    counts: dict[str, int],
    progress: Progress | None,
) -> list[dict[str, Any]]:
    """Run the shards one after another, staging each as soon as it finishes."""
    total = sum(len(s) for s in plan_info.shards)
    progress_id = create_progress_artifact(  # every run has one: 100% at once when nothing is left to run
        progress=0.0 if total else 100.0,
        key=f"{_artifact_key(spec)}-progress",
        description=f"prompts of {spec.output.table}",
    )
    if not plan_info.shards:
        get_run_logger().info("nothing to run: no model is loaded")
        return []
    device = job.device_name(spec)
    limit = _device_limit(device)
    engine_stats = []
    done = 0
    for k, indices in enumerate(plan_info.shards):
        groups = plan_info.groups(k)
        rows, stats = infer(
            spec, prepared, indices, groups, done, total, progress_id, device, limit, progress
        )
        _stage_counted(spec, counts, rows)
        engine_stats.append(stats)
        done += len(indices)
    return engine_stats


def _stage_counted(spec: JobSpec, counts: dict[str, int], rows: pa.Table) -> None:
    """Stage rows (a finished shard's, or the rows that failed before inference) at once and count
    them: the one way rows reach staging, in-process or from Ray actors."""
    stage(spec, rows)
    ok, errors = results.count_status(rows)
    counts["rows_processed"] += rows.num_rows
    counts["rows_ok"] += ok
    counts["rows_error"] += errors


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - start


class _Progress:
    """One shard's engine progress -> the run's overall count: the caller's callback and the
    Prefect progress artifact (throttled)."""

    def __init__(self, artifact_id: Any, done_before: int, total: int, forward: Progress | None) -> None:
        self.artifact_id = artifact_id
        self.done_before = done_before
        self.total = max(total, 1)
        self.forward = forward
        self.last = 0.0
        self.reported = False

    def __call__(self, done: int, total: int) -> None:
        if not self.reported:  # fault tests stop the n-th shard here, its engine running
            self.reported = True
            pause_point("infer")
        overall = self.done_before + done
        if self.forward is not None:
            self.forward(overall, self.total)
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            update_progress_artifact(self.artifact_id, progress=100.0 * overall / self.total)

    def finish(self, shard_size: int) -> None:
        self.last = 0.0  # the final update is never throttled away
        self(shard_size, shard_size)


def _device_limit(device: str) -> str | None:
    """The global concurrency limit named for the device ("gpu" or "cpu"), if the server has one."""
    name = "gpu" if device == "cuda" else "cpu"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None
    return name


def _artifact_key(spec: JobSpec) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    raw = (spec.name or spec.output.table).lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-") or "batchllm"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


if __name__ == "__main__":
    import sys

    enrich(sys.argv[1])
