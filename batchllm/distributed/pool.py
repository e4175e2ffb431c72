"""The job's engine actors, leased one shard at a time to the threads that run shards.

An actor is handed out once Ray has placed and started it (its ``info`` has
answered), so a lease never waits on an actor the cluster cannot place. A
shard's retry prefers an actor it has not tried yet: it waits for one a while
(TRIED_GRACE_S), then takes a tried one that is idle. A dead actor
(its process gone: node lost, OOM kill, SIGKILL) leaves the pool and a new one
is started in its place, up to as many replacements as the pool has actors.
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from batchllm.distributed.cluster import Cluster
from batchllm.spec import JobSpec

TRIED_GRACE_S = 30.0  # a retry waits this long for an actor it has not tried before taking a tried one
NAMESPACE = "batchllm"  # actors are named batchllm-<run id>-<index> here, found with ray.get_actor


@cache
def _actor_class() -> Any:
    """``ShardWorker`` as a Ray actor class (made once per process)."""
    import ray

    from batchllm.distributed.worker import ShardWorker

    return ray.remote(ShardWorker)


class NoActorError(RuntimeError):
    """No engine actor is alive or could be started in time."""


@dataclass
class Member:
    """One engine actor of the pool."""

    index: int
    handle: Any
    ready: Any  # the ObjectRef of its first ``info`` call: resolved once Ray has started it
    info: dict[str, Any] = field(default_factory=dict)
    busy: bool = False
    dead: bool = False
    shards_run: int = 0
    started: float = field(default_factory=time.monotonic)  # when it was asked for (the start timeout's)


class ActorPool:
    """Engine actors of one run: lease an idle one, give it back, report it dead."""

    def __init__(self, spec: JobSpec, cluster: Cluster, run_id: str) -> None:
        import ray

        self._ray = ray
        worker_spec = spec.model_copy(update={"device": cluster.device})  # the cluster's, not this host's
        self._options: dict[str, Any] = {
            "num_cpus": cluster.num_cpus,
            "num_gpus": cluster.num_gpus,
            "max_concurrency": 4,  # poll and status answer while load and run compute
            "max_restarts": 0,  # a dead actor is replaced here, its shard retried by the flow
            "namespace": NAMESPACE,
        }
        if spec.executor.runtime_env:
            self._options["runtime_env"] = spec.executor.runtime_env
        self._spec = worker_spec
        self._run_id = run_id
        self._timeout = spec.executor.start_timeout_s
        self._changed = threading.Condition()
        self.members: list[Member] = []
        self.replacements_left = cluster.actors
        self.died: list[dict[str, Any]] = []
        for _ in range(cluster.actors):
            self._start()

    def lease(self, tried: set[int]) -> Member:
        """An idle, started actor, preferring one not in ``tried``; waits while all are busy.

        A tried actor that is idle is taken after TRIED_GRACE_S of waiting for the others (they may be
        busy for the rest of the run). Raises NoActorError when none is alive, or when none has started
        and each has been starting for ``executor.start_timeout_s`` (the cluster cannot place them);
        busy ones are waited for.
        """
        start = time.monotonic()
        with self._changed:
            while True:
                self._refresh()
                alive = [m for m in self.members if not m.dead]
                if not alive:
                    raise NoActorError("no engine actor is alive and no replacement is left to start")
                waited = time.monotonic() - start
                fresh = [m for m in alive if m.index not in tried]
                pick = [m for m in (fresh or alive) if m.info and not m.busy]
                if not pick and waited > min(TRIED_GRACE_S, self._timeout):
                    pick = [m for m in alive if m.info and not m.busy]
                if pick:
                    member = min(pick, key=lambda m: (m.shards_run, m.index))
                    member.busy = True
                    return member
                now = time.monotonic()
                if not any(m.info for m in alive) and all(now - m.started > self._timeout for m in alive):
                    raise NoActorError(
                        f"no engine actor started within {self._timeout:g}s "
                        "(executor.start_timeout_s; can the cluster place the actors?)"
                    )
                self._changed.wait(timeout=0.2)  # also wakes to notice actors that finished starting

    def release(self, member: Member, dead: bool = False, reason: str = "") -> None:
        """Give an actor back after a shard; a dead one is dropped and replaced if allowed."""
        with self._changed:
            member.busy = False
            member.shards_run += 1
            if dead and not member.dead:
                member.dead = True
                with suppress(Exception):  # unreachable rather than gone: make sure it is gone
                    self._ray.kill(member.handle, no_restart=True)
                self.died.append({**member.info, "index": member.index, "reason": reason[:500]})
                if self.replacements_left > 0:
                    self.replacements_left -= 1
                    self._start()
            self._changed.notify_all()

    def describe(self) -> list[dict[str, Any]]:
        """Each actor: where it ran, how many shards it was given, whether it died."""
        return [{**m.info, "index": m.index, "shards": m.shards_run, "dead": m.dead} for m in self.members]

    def close(self) -> None:
        """Free every engine and end the actor processes."""
        for m in self.members:
            if not m.dead:
                with suppress(Exception):  # a dying actor changes nothing here
                    self._ray.get(m.handle.close.remote(), timeout=30)
                self._ray.kill(m.handle, no_restart=True)

    def _start(self) -> None:
        index = len(self.members)
        name = f"batchllm-{self._run_id}-{index}"
        handle = _actor_class().options(name=name, **self._options).remote(self._spec, index)
        handle.load.remote()  # the model loads as soon as the actor starts, before its first shard
        self.members.append(Member(index=index, handle=handle, ready=handle.info.remote()))

    def _refresh(self) -> None:
        """Record the info of actors that have started; an actor that failed to start is dead."""
        pending = [m for m in self.members if not m.info and not m.dead]
        if not pending:
            return
        done, _ = self._ray.wait([m.ready for m in pending], num_returns=len(pending), timeout=0)
        for m in pending:
            if m.ready in done:
                try:
                    m.info = self._ray.get(m.ready)
                except Exception as exc:  # the actor could not start: drop it
                    m.dead = True
                    self.died.append({"index": m.index, "reason": f"did not start: {exc}"[:500]})
