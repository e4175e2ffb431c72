"""The `enrich` flow: SQL rows in, a results table out.

extract -> prepare (render + tokenize) -> plan -> infer (one task per shard,
the engine created inside it) -> stage -> load -> report. Each task wraps one
batchllm call; retries sit on the warehouse I/O; inference holds a slot of the
global concurrency limit named for its device ("gpu" or "cpu") when that limit
exists. Runs in Prefect's ephemeral mode without a server, or against one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
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
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from batchllm import job, report, results, warehouse
from batchllm.backends.base import GroupSpec, Outcome, Progress
from batchllm.connection import check_writable
from batchllm.distributed import cluster as ray_cluster
from batchllm.distributed import dispatch
from batchllm.distributed.pool import ActorPool
from batchllm.faults import pause_point
from batchllm.spec import JobSpec, SpecError, load_spec


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


@task(cache_policy=NO_CACHE, task_run_name="infer-shard-{shard}")
def infer_remote(
    spec: JobSpec,
    prepared: job.Prepared,
    shard: int,
    indices: list[int],
    prompts: Any,
    groups: list[GroupSpec] | None,
    ray_run: RayRun,
) -> tuple[pa.Table, dict[str, Any]]:
    """Run one shard on an engine actor of the Ray cluster (a retry goes to another actor)."""
    logger = get_run_logger()
    attempt = len(ray_run.ledger.attempts.get(shard, [])) + 1
    logger.info("shard %d: %d prompts, attempt %d", shard, len(indices), attempt)
    ray_run.progress.update(shard, 0)

    def forward(member: Any, line: str) -> None:
        level, _, text = line.partition(" ")
        logger.log(
            getattr(logging, level, logging.INFO),
            "[actor %d pid %s] %s",
            member.index,
            member.info.get("pid"),
            text,
        )

    outcomes, stats = dispatch.run_shard(
        ray_run.pool,
        ray_run.ledger,
        shard,
        prompts,
        groups,
        lambda done: ray_run.progress.update(shard, done),
        forward,
    )
    ray_run.progress.update(shard, len(indices), final=True)
    rows = results.result_rows(spec, prepared, indices, outcomes)
    ok, errors = results.count_status(rows)
    logger.info(
        "shard %d done on actor %d: %d rows ok, %d errors, %.1fs",
        shard,
        stats["actor"]["index"],
        ok,
        errors,
        stats.get("run_s", 0.0),
    )
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
            cluster = _join(spec)
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
        stage(spec, errors)
        _count(counts, errors)
        logger.warning("%d rows failed before inference, e.g. %s", errors.num_rows, errors.column("error")[0])
    executor: dict[str, Any] = {"kind": "local"}
    with _timed(timings, "infer_s"):
        if cluster is None:
            engine_stats = _infer_shards(spec, prepared, plan_info, counts, progress)
        else:
            engine_stats, executor = _infer_on_ray(spec, prepared, plan_info, counts, progress, cluster)
    device = (cluster.device if cluster else job.device_name(spec)) if plan_info.shards else "none"
    run = report.run_record(spec, prepared, plan_info, engine_stats, counts, timings, device)
    run["recovered_runs"] = recovered_runs  # the runs table says whose work this run finished
    run["executor"] = executor
    with _timed(run["timings"], "load_s"):
        run["rows_written"] = load(spec, run)
    publish_report(spec, run)
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
    if not plan_info.shards:
        get_run_logger().info("nothing to run: no model is loaded")
        return []
    total = sum(len(s) for s in plan_info.shards)
    progress_id = create_progress_artifact(
        progress=0.0, key=f"{_artifact_key(spec)}-progress", description=f"prompts of {spec.output.table}"
    )
    device = job.device_name(spec)
    limit = _device_limit(device)
    engine_stats = []
    done = 0
    for k, indices in enumerate(plan_info.shards):
        groups = plan_info.groups(k)
        rows, stats = infer(
            spec, prepared, indices, groups, done, total, progress_id, device, limit, progress
        )
        stage(spec, rows)
        _count(counts, rows)
        engine_stats.append(stats)
        done += len(indices)
    return engine_stats


def _join(spec: JobSpec) -> ray_cluster.Cluster:
    """Join the job's Ray cluster (or start a local one), logging its shape."""
    cluster = ray_cluster.connect(spec)
    info = cluster.describe()
    get_run_logger().info(
        "ray cluster %s: %g CPUs, %g GPUs; %d engine actors on %s (%g CPUs, %g GPUs each)",
        info["address"],
        info["cluster_cpus"],
        info["cluster_gpus"],
        cluster.actors,
        cluster.device,
        cluster.num_cpus,
        cluster.num_gpus,
    )
    return cluster


@dataclass
class RayRun:
    """What the shard tasks of one run share: the actor pool, the ledger of attempts, the progress."""

    pool: ActorPool
    ledger: dispatch.ShardLedger
    progress: _SharedProgress


def _infer_on_ray(
    spec: JobSpec,
    prepared: job.Prepared,
    plan_info: job.PlanInfo,
    counts: dict[str, int],
    progress: Progress | None,
    cluster: ray_cluster.Cluster,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the shards on the cluster's engine actors, largest first, one task per shard; stage each
    shard as it finishes. A shard that fails ``executor.max_attempts`` times becomes error rows."""
    logger = get_run_logger()
    executor: dict[str, Any] = {"kind": "ray", **cluster.describe()}
    if not plan_info.shards:
        logger.info("nothing to run: no actor is started")
        return [], executor
    total = sum(len(s) for s in plan_info.shards)
    progress_id = create_progress_artifact(
        progress=0.0, key=f"{_artifact_key(spec)}-progress", description=f"prompts of {spec.output.table}"
    )
    pool = ActorPool(spec, cluster, prepared.run_id)
    ray_run = RayRun(pool, dispatch.ShardLedger(), _SharedProgress(progress_id, total, progress))
    shard_task = infer_remote.with_options(retries=spec.executor.max_attempts - 1, retry_delay_seconds=1)
    order = sorted(range(len(plan_info.shards)), key=lambda k: (-_shard_cost(plan_info, k), k))
    engine_stats: list[dict[str, Any]] = []
    try:
        with ThreadPoolTaskRunner(max_workers=cluster.actors) as runner:
            futures = {}
            for k in order:
                indices = plan_info.shards[k]
                prompts = dispatch.put_prompts([prepared.prompts.token_ids[i] for i in indices])
                parameters = {
                    "spec": spec,
                    "prepared": prepared,
                    "shard": k,
                    "indices": indices,
                    "prompts": prompts,
                    "groups": plan_info.groups(k),
                    "ray_run": ray_run,
                }
                futures[runner.submit(shard_task, parameters=parameters)] = k
            for future in as_completed(list(futures)):
                k = futures[future]
                rows, stats = _shard_rows(spec, prepared, plan_info, ray_run, k, future)
                if not ray_run.ledger.finish(k):  # never staged twice
                    continue
                stage(spec, rows)
                _count(counts, rows)
                if stats is not None:
                    engine_stats.append(stats)
    finally:
        executor["actors_started"] = pool.describe()
        executor["actors_died"] = pool.died
        pool.close()
    executor.update(ray_run.ledger.summary())
    return engine_stats, executor


def _shard_rows(
    spec: JobSpec,
    prepared: job.Prepared,
    plan_info: job.PlanInfo,
    ray_run: RayRun,
    shard: int,
    future: Any,
) -> tuple[pa.Table, dict[str, Any] | None]:
    """A finished shard's rows and stats; a shard out of attempts: one error row per row, no stats."""
    try:
        return future.result()
    except Exception as exc:  # the shard's last attempt failed
        error = f"{type(exc).__name__}: {exc}"
    indices = plan_info.shards[shard]
    attempts = ray_run.ledger.attempts.get(shard, [])
    last = attempts[-1]["error"] if attempts else error
    message = f"shard {shard} failed {max(len(attempts), 1)} time(s) on the Ray cluster; last: {last}"
    get_run_logger().error("%s: its %d prompts become error rows", message, len(indices))
    ray_run.progress.update(shard, len(indices), final=True)
    failed = [Outcome(prompt_tokens=0, finish_reason="error", error=message) for _ in indices]
    return results.result_rows(spec, prepared, indices, failed), None


def _shard_cost(plan_info: job.PlanInfo, shard: int) -> float:
    """The planner's cost estimate of a shard: physical prefill + decode tokens (prompts if no plan)."""
    if not plan_info.parts:
        return float(len(plan_info.shards[shard]))
    return float(plan_info.parts[shard].stats.physical_tokens) + float(
        plan_info.parts[shard].stats.decode_tokens
    )


def _count(counts: dict[str, int], rows: pa.Table) -> None:
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


class _SharedProgress:
    """The run's one progress count over shards running at once on several actors: the caller's
    callback and the Prefect progress artifact (throttled). A retried shard counts from zero again."""

    def __init__(self, artifact_id: Any, total: int, forward: Progress | None) -> None:
        self.artifact_id = artifact_id
        self.total = max(total, 1)
        self.forward = forward
        self.done: dict[int, int] = {}
        self.last = 0.0
        self.lock = threading.Lock()

    def update(self, shard: int, done: int, final: bool = False) -> None:
        with self.lock:
            if self.done.get(shard) == done and not final:
                return
            self.done[shard] = done
            overall = sum(self.done.values())
            if self.forward is not None:
                self.forward(overall, self.total)
            now = time.monotonic()
            if not (final or now - self.last >= 1.0):
                return
            self.last = now
        update_progress_artifact(self.artifact_id, progress=100.0 * overall / self.total)


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
