"""Inference on Ray engine actors as Prefect tasks: one task per shard, each run on a leased actor.

The flow (enrich.py) joins the cluster, then ``infer_on_ray`` starts the actor
pool and submits a task per shard, largest first, at most one per actor at a
time; Prefect retries a failed shard (``executor.max_attempts``), the retry
going to another actor; a shard out of attempts becomes error rows. Finished
shards come back to the flow's thread in completion order, which stages them
at once: only the flow writes to the warehouse. Actor progress feeds one
progress bar and the actors' log lines go to the task's logger (docs/ray.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from batchllm import job, results
from batchllm.backends.base import GroupSpec, Outcome, Progress
from batchllm.distributed import cluster as ray_cluster
from batchllm.distributed import dispatch
from batchllm.distributed.pool import ActorPool
from batchllm.spec import JobSpec


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


def join(spec: JobSpec) -> ray_cluster.Cluster:
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
    progress: SharedProgress


def infer_on_ray(
    spec: JobSpec,
    prepared: job.Prepared,
    plan_info: job.PlanInfo,
    cluster: ray_cluster.Cluster,
    progress: Progress | None,
    artifact_key: str,
    on_rows: Callable[[pa.Table], None],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the shards on the cluster's engine actors, largest first, one task per shard; hand each
    finished shard's rows to ``on_rows`` (the flow stages them) at once, in this thread. A shard
    that fails ``executor.max_attempts`` times becomes error rows. Returns engine stats per shard
    and the executor's record (cluster, actors, attempts)."""
    logger = get_run_logger()
    executor: dict[str, Any] = {"kind": "ray", **cluster.describe()}
    total = sum(len(s) for s in plan_info.shards)
    progress_id = create_progress_artifact(  # every run has one: 100% at once when nothing is left to run
        progress=0.0 if total else 100.0,
        key=f"{artifact_key}-progress",
        description=f"prompts of {spec.output.table}",
    )
    if not plan_info.shards:
        logger.info("nothing to run: no actor is started")
        return [], executor
    pool = ActorPool(spec, cluster, prepared.run_id)
    ray_run = RayRun(pool, dispatch.ShardLedger(), SharedProgress(progress_id, total, progress))
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
                on_rows(rows)
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


class SharedProgress:
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
