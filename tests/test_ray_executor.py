"""The enrich flow on a local Ray cluster of 2 CPU workers, with the real default model.

One Ray cluster and one temporary Prefect server for the module. A Ray run
must give the same rows and the same planned and achieved prefix saving as
the one-process run of the same job; an engine actor killed with SIGKILL in
the middle of its shard (its pid asked of the actor through Ray) loses and
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
# A small KV pool loads fast; a small step budget spreads a shard over several engine steps; the
# reference attention backend: the executor is under test here, the same engine on both sides.
ENGINE = {"kv_cache_gb": 0.25, "max_num_batched_tokens": 64, "attention": "torch"}
# Columns that differ between two runs by construction.
RUN_COLUMNS = ("run_id", "created_at")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster of 2 CPUs for the module: two engine actors of one CPU each."""
    from batchllm.distributed.cluster import QUIET_ENV

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
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

    return enrich(spec)


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
    assert len({a["pid"] for s in executor["shards"] for a in s["attempts"]}) == 2


def test_sigkill_of_an_actor_mid_shard_loses_and_duplicates_nothing(
    tmp_path: Path, ray_cluster: None, local_run: dict[str, Any]
) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", ROWS)
    with _Killer(shard=None, times=1) as killer:
        run = _run(_spec(db, executor={"kind": "ray", "actors": 2}))
    assert len(killer.killed) == 1
    victim = killer.killed[0]
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
    with _Killer(shard=0, times=2) as killer:
        run = _run(_spec(db, executor={"kind": "ray", "actors": 2, "max_attempts": 2}))
    assert len(killer.killed) == 2 and killer.killed[0]["pid"] != killer.killed[1]["pid"]
    rows = query(db, "SELECT id, status, error FROM labels ORDER BY id")
    assert [r[0] for r in rows] == list(range(ROWS))
    failed = [r for r in rows if r[1] == "error"]
    assert failed and all("shard 0 failed 2 time(s) on the Ray cluster" in r[2] for r in failed)
    assert run["rows_error"] == len(failed) and run["rows_ok"] == ROWS - len(failed) > 0
    assert run["executor"]["failed_shards"] == 1


class _Killer:
    """Watches the run's engine actors through Ray and SIGKILLs the one running ``shard`` (any
    shard when None) while its engine is at work, ``times`` times."""

    def __init__(self, shard: int | None, times: int) -> None:
        self.shard = shard
        self.times = times
        self.killed: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        from batchllm.distributed.pool import NAMESPACE

        seen: set[int] = set()
        while not self._stop.is_set() and len(self.killed) < self.times:
            for entry in ray.util.list_named_actors(all_namespaces=True):
                if entry["namespace"] != NAMESPACE:
                    continue
                try:
                    status = ray.get(
                        ray.get_actor(entry["name"], namespace=NAMESPACE).status.remote(), timeout=2
                    )
                except Exception:  # gone, or not started yet
                    continue
                running = status["shard"] is not None and 0 < status["done"] < status["total"]
                wanted = self.shard is None or status["shard"] == self.shard
                if running and wanted and status["pid"] not in seen:
                    seen.add(status["pid"])
                    os.kill(status["pid"], signal.SIGKILL)
                    self.killed.append(status)
                    break
            time.sleep(0.02)
