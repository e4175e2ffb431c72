"""The enrich flow on a local Ray cluster of 2 CPU workers, with the real default model.

One Ray cluster and one temporary Prefect server for the module. A Ray run
must give the same rows and the same planned and achieved prefix saving as
the one-process run of the same job; an engine actor killed with SIGKILL in
the middle of its shard (paused there by a fault point; its pid asked of the
actor through Ray) loses and
duplicates no row; a shard whose actor dies on every attempt becomes error
rows and the job still completes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchllm.spec import SpecError, parse_spec
from tests.product_fixtures import make_reviews_db, query, spec_dict

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

ROWS = 12
# A small KV pool loads fast; a small step budget spreads a shard over several engine steps.
ENGINE = {"kv_cache_gb": 0.25, "max_num_batched_tokens": 64}
# Columns that differ between two runs by construction.
RUN_COLUMNS = ("run_id", "created_at")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster of 2 CPUs for the module: two engine actors of one CPU each."""
    from batchllm.distributed.cluster import QUIET_ENV

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 2**20,  # prompts and outcomes of a few rows; small /dev/shm in CI
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server and database for this module; never the user's server."""
    saved = dict(os.environ)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> dict[str, Any]:
    """The one-process run of the job (2 shards, one after another): what Ray runs must equal.

    With one torch thread, as each actor has (Ray sets OMP_NUM_THREADS to the actor's CPUs): CPU
    matmuls split over another number of threads may round differently in the last bit.
    """
    import torch

    db = make_reviews_db(tmp_path_factory.mktemp("local") / "w.duckdb", ROWS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _run(_spec(db, executor={"kind": "local"}))
    finally:
        torch.set_num_threads(threads)
    return {"run": run, "rows": _rows(db)}


def _spec(db: Path, **over: Any) -> Any:
    return parse_spec(spec_dict(db, shards=2, engine_options=ENGINE, **over))


def _run(spec: Any) -> dict[str, Any]:
    from batchllm.flows.enrich import enrich

    state = enrich(spec, return_state=True)
    return {**state.result(), "flow_run_id": state.state_details.flow_run_id}


def _prefect_view(flow_run_id: Any) -> tuple[dict[str, Any], list[str], list[str]]:
    """What the Prefect server holds of a flow run: artifacts by type, task run names, log messages."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
        )
    return {a.type: a for a in artifacts}, [t.name for t in tasks], [entry.message for entry in logs]


def _rows(db: Path) -> list[dict[str, Any]]:
    names = [r[0] for r in query(db, "SELECT column_name FROM (DESCRIBE labels)")]
    keep = [n for n in names if n not in RUN_COLUMNS]
    cols = ", ".join(f'"{n}"' for n in keep)
    return [dict(zip(keep, r, strict=True)) for r in query(db, f"SELECT {cols} FROM labels ORDER BY id")]


def test_executor_fields_are_checked_before_any_work(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    with pytest.raises(SpecError, match=r"executor\.actors: only used with kind 'ray'"):
        parse_spec(spec_dict(db, executor={"actors": 2}))
    with pytest.raises(SpecError, match=r"executor\.kind"):
        parse_spec(spec_dict(db, executor={"kind": "mpi"}))
    with pytest.raises(SpecError, match=r"executor\.max_attempts"):
        parse_spec(spec_dict(db, executor={"kind": "ray", "max_attempts": 0}))
    from batchllm.distributed.cluster import _check_reachable

    with pytest.raises(SpecError, match=r"^executor\.address: nothing answers at 127\.0\.0\.1:1 "):
        _check_reachable("127.0.0.1:1")  # Ray itself would retry it for minutes
    with pytest.raises(SpecError, match=r"^executor\.address: 'head' is not host:port"):
        _check_reachable("head")
    local = parse_spec(spec_dict(db))
    on_ray = parse_spec(spec_dict(db, executor={"kind": "ray", "actors": 2}))
    assert local.spec_hash == on_ray.spec_hash  # where it runs is not what it computes


def test_cluster_sizing(tmp_path: Path, ray_cluster: None) -> None:
    """One actor per CPU slot here; per GPU (or per vLLM tensor-parallel group) where there are GPUs."""
    from batchllm.distributed import cluster

    db = tmp_path / "w.duckdb"
    joined = cluster.connect(parse_spec(spec_dict(db, executor={"kind": "ray"})))
    assert (joined.actors, joined.num_cpus, joined.num_gpus, joined.device) == (2, 1.0, 0.0, "cpu")
    assert not joined.started  # the module's cluster: a run leaves it running
    with pytest.raises(SpecError, match=r"^device: 'cuda' but the Ray cluster has no GPUs"):
        cluster.connect(parse_spec(spec_dict(db, device="cuda", executor={"kind": "ray"})))
    with pytest.raises(SpecError, match=r"^executor\.cpus_per_actor: 4 CPUs per actor, the cluster has 2"):
        cluster.connect(parse_spec(spec_dict(db, executor={"kind": "ray", "cpus_per_actor": 4})))
    gpus = {"CPU": 32.0, "GPU": 2.0}
    native = parse_spec(spec_dict(db, device="auto", executor={"kind": "ray"}))
    device, per_actor = cluster._actor_device(native, gpus)
    assert (device, per_actor, cluster._default_actors(gpus, 1.0, per_actor)) == ("cuda", 1.0, 2)
    tp = native.updated(backend="vllm", engine_options={"tensor_parallel_size": 2})
    device, per_actor = cluster._actor_device(tp, gpus)
    assert (device, per_actor, cluster._default_actors(gpus, 1.0, per_actor)) == ("cuda", 2.0, 1)


def test_ray_run_equals_one_process_run(tmp_path: Path, ray_cluster: None, local_run: dict[str, Any]) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", ROWS)
    run = _run(_spec(db, executor={"kind": "ray", "actors": 2}))
    assert _rows(db) == local_run["rows"]
    base = local_run["run"]
    assert run["rows_ok"] == ROWS and run["rows_error"] == 0
    assert run["planned_saving_ratio"] == base["planned_saving_ratio"] > 0.2
    assert run["achieved_saving_ratio"] == base["achieved_saving_ratio"] > 0.2
    executor = run["executor"]
    assert executor["kind"] == "ray" and executor["retried_shards"] == 0 and not executor["actors_died"]
    # one shard per actor, each run once: whole prefix groups stayed on one actor
    assert sorted(a["actor"] for s in executor["shards"] for a in s["attempts"]) == [0, 1]
    pids = {a["pid"] for s in executor["shards"] for a in s["attempts"]}
    assert len(pids) == 2

    # Prefect orchestrates: a task per shard, one progress bar over both actors, the actors' logs (sent
    # to the server in batches: on a loaded machine the last batch may land after the flow returns)
    def loaded(logs: list[str], pid: int) -> bool:
        return any(m.startswith("[actor ") and f"pid {pid}] " in m and "model loaded" in m for m in logs)

    deadline = time.monotonic() + 20
    while True:
        artifacts, tasks, logs = _prefect_view(run["flow_run_id"])
        if all(loaded(logs, pid) for pid in pids) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"infer-shard-0", "infer-shard-1"} <= set(tasks)
    assert artifacts["progress"].data == 100.0
    for pid in pids:
        assert loaded(logs, pid), [m for m in logs if m.startswith("[actor ")]

    # a rerun with nothing left starts no actor and still has its progress artifact, at 100%
    again = _run(_spec(db, executor={"kind": "ray", "actors": 2}, incremental=True))
    assert again["rows_processed"] == 0 and again["rows_skipped"] == ROWS
    artifacts, _, _ = _prefect_view(again["flow_run_id"])
    assert artifacts["progress"].data == 100.0


def test_sigkill_of_an_actor_mid_shard_loses_and_duplicates_nothing(
    tmp_path: Path, ray_cluster: None, local_run: dict[str, Any]
) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", ROWS)
    with _Killer(tmp_path, shard=0, times=1) as killer:
        run = _run(_spec(db, executor={"kind": "ray", "actors": 2, "runtime_env": killer.runtime_env()}))
    assert len(killer.killed) == 1
    victim = killer.killed[0]
    assert killer.paused[0] == f"actor-shard-0 1 {victim['pid']}"  # Ray's pid is the paused process
    ids = [r[0] for r in query(db, "SELECT id FROM labels")]
    assert sorted(ids) == list(range(ROWS))  # 0 lost, 0 duplicated
    assert _rows(db) == local_run["rows"]
    base = local_run["run"]
    assert run["rows_ok"] == ROWS and run["rows_processed"] == ROWS
    assert run["planned_saving_ratio"] == base["planned_saving_ratio"]
    assert run["achieved_saving_ratio"] == base["achieved_saving_ratio"]
    executor = run["executor"]
    assert executor["retried_shards"] == 1 and executor["failed_shards"] == 0
    assert [d["pid"] for d in executor["actors_died"]] == [victim["pid"]]
    retried = next(s for s in executor["shards"] if len(s["attempts"]) > 1)
    first, second = retried["attempts"]
    assert retried["shard"] == victim["shard"]
    assert first["status"] == "actor died" and first["pid"] == victim["pid"]
    assert second["status"] == "ok" and second["pid"] != victim["pid"]
    assert len(run["engine"]) == 2  # each shard's stats once: the killed attempt left none


def test_a_shard_failing_twice_becomes_error_rows(tmp_path: Path, ray_cluster: None) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", ROWS)
    with _Killer(tmp_path, shard=0, times=2) as killer:
        executor = {"kind": "ray", "actors": 2, "max_attempts": 2, "runtime_env": killer.runtime_env()}
        run = _run(_spec(db, executor=executor))
    assert len(killer.killed) == 2 and killer.killed[0]["pid"] != killer.killed[1]["pid"]
    rows = query(db, "SELECT id, status, error FROM labels ORDER BY id")
    assert [r[0] for r in rows] == list(range(ROWS))
    failed = [r for r in rows if r[1] == "error"]
    assert failed and all("shard 0 failed 2 time(s) on the Ray cluster" in r[2] for r in failed)
    assert run["rows_error"] == len(failed) and run["rows_ok"] == ROWS - len(failed) > 0
    assert run["executor"]["failed_shards"] == 1


def test_an_engine_error_is_retried_on_another_actor(tmp_path: Path, ray_cluster: None) -> None:
    """An engine that raises (here: at its start, a max_model_len beyond the model's context, which only
    the model's config tells) fails the attempt, not the actor: the retry goes to the other actor,
    then the shard's rows become error rows."""
    db = make_reviews_db(tmp_path / "w.duckdb", 4)
    options = {"max_model_len": 100_000}
    spec = parse_spec(spec_dict(db, shards=2, engine_options=options, executor={"kind": "ray", "actors": 2}))
    run = _run(spec)
    rows = query(db, "SELECT id, status, error FROM labels ORDER BY id")
    assert [r[0] for r in rows] == [0, 1, 2, 3] and run["rows_error"] == 4
    assert all(
        r[1] == "error" and "failed 2 time(s)" in r[2] and "max_model_len: must be in [1, 8192]" in r[2]
        for r in rows
    )
    executor = run["executor"]
    assert executor["failed_shards"] == len(executor["shards"]) >= 1 and not executor["actors_died"]
    for shard in executor["shards"]:
        first, second = shard["attempts"]
        assert first["status"] == second["status"] == "error" and first["actor"] != second["actor"]


class _Killer:
    """SIGKILLs the engine actor running ``shard``, ``times`` times, each time mid-shard.

    The run's actors get ``BATCHLLM_PAUSE_AT=actor-shard-K:1`` (through ``executor.runtime_env``):
    an actor pauses at its first progress report of shard K, its engine at work. The killer then
    asks the run's actors through Ray (named actors, their ``status``) which one runs shard K,
    kills that pid with ``os.kill(pid, SIGKILL)`` and lets the others go on.
    """

    def __init__(self, tmp_path: Path, shard: int, times: int) -> None:
        self.shard = shard
        self.times = times
        self.marker = tmp_path / "pause"
        self.killed: list[dict[str, Any]] = []
        self.paused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def runtime_env(self) -> dict[str, Any]:
        env = {"BATCHLLM_PAUSE_AT": f"actor-shard-{self.shard}:1", "BATCHLLM_PAUSE_FILE": str(self.marker)}
        return {"env_vars": env}

    def __enter__(self) -> _Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.marker.exists() and (text := self.marker.read_text().strip()):  # written in full
                self.paused.append(text)
                if len(self.killed) < self.times:
                    self._kill_shard_runner()
                self.marker.unlink()  # the paused actors go on
            time.sleep(0.02)

    def _kill_shard_runner(self) -> None:
        from batchllm.distributed.pool import NAMESPACE

        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != NAMESPACE:
                continue
            try:
                actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
                status = ray.get(actor.status.remote(), timeout=10)
            except Exception:  # gone, or not started yet
                continue
            if status["shard"] == self.shard and 0 < status["done"] < status["total"]:
                os.kill(status["pid"], signal.SIGKILL)
                self.killed.append(status)
                return
