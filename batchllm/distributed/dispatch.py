"""One attempt at one shard on a leased engine actor, watched until it ends.

``ShardLedger`` keeps, per shard, the actors tried and each attempt's end, so
a retry goes to another actor and the run record says what happened. An
attempt ends with the shard's outcomes, or with ``ShardFailed``: the actor
died (its process is gone; the pool replaces it) or the engine raised. The
caller (the flow's task) retries a failed shard up to ``executor.max_attempts``
times, then turns it into per-row errors. A finished shard is returned once and
never run again; its outcomes are the caller's to stage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchllm.backends.base import GroupSpec, Outcome
from batchllm.distributed.pool import ActorPool, Member

POLL_S = 0.5  # progress and log lines are fetched from a running actor this often
FINAL_POLL_S = 30.0  # after a shard: how long to wait for the actor's last lines (a busy host answers late)


class ShardFailed(RuntimeError):
    """One attempt at a shard failed; ``actor_died`` says whether its actor is gone."""

    def __init__(self, message: str, actor_died: bool) -> None:
        super().__init__(message)
        self.actor_died = actor_died


@dataclass
class ShardLedger:
    """Attempts per shard (thread-safe): which actors were tried, and how each attempt ended."""

    attempts: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tried(self, shard: int) -> set[int]:
        with self._lock:
            return {a["actor"] for a in self.attempts.get(shard, [])}

    def record(self, shard: int, member: Member, status: str, seconds: float, error: str = "") -> None:
        entry = {"actor": member.index, "pid": member.info.get("pid"), "host": member.info.get("host")}
        entry.update(status=status, seconds=round(seconds, 3), error=error[:500])
        with self._lock:
            self.attempts.setdefault(shard, []).append(entry)

    def finish(self, shard: int) -> bool:
        """Mark a shard finished; False if it already was (its result must then be dropped)."""
        with self._lock:
            if shard in self.finished:
                return False
            self.finished.add(shard)
            return True

    def summary(self) -> dict[str, Any]:
        with self._lock:
            shards = [{"shard": s, "attempts": a} for s, a in sorted(self.attempts.items())]
        return {
            "shards": shards,
            "retried_shards": sum(1 for s in shards if len(s["attempts"]) > 1),
            "failed_shards": sum(1 for s in shards if s["attempts"][-1]["status"] != "ok"),
        }


def run_shard(
    pool: ActorPool,
    ledger: ShardLedger,
    shard: int,
    token_ids: Any,
    groups: list[GroupSpec] | None,
    on_progress: Callable[[int], None],
    on_log: Callable[[Member, str], None],
) -> tuple[list[Outcome], dict[str, Any]]:
    """Run ``shard`` (``token_ids``: its prompts, or a Ray ObjectRef of them) on one leased actor.

    ``on_progress(done)`` follows the shard's prompts done, ``on_log`` the actor's log lines.
    Raises ``ShardFailed`` when this attempt fails.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    member = pool.lease(ledger.tried(shard))
    t0 = time.perf_counter()
    watcher = _Watcher(member, shard, on_progress, on_log)
    try:
        ref = member.handle.run.remote(shard, token_ids, groups)
        while not ray.wait([ref], timeout=POLL_S)[0]:
            watcher.poll()
        watcher.poll(final=True)
        outcomes, stats = ray.get(ref)
    except RayActorError as exc:
        reason = f"actor {member.index} (pid {member.info.get('pid')}) died: {_first_line(exc)}"
        pool.release(member, dead=True, reason=reason)
        ledger.record(shard, member, "actor died", time.perf_counter() - t0, reason)
        raise ShardFailed(f"shard {shard}: {reason}", actor_died=True) from None
    except RayTaskError as exc:
        cause = exc.cause if exc.cause is not None else exc
        reason = f"actor {member.index}: {type(cause).__name__}: {_first_line(cause)}"
        pool.release(member)
        ledger.record(shard, member, "error", time.perf_counter() - t0, reason)
        raise ShardFailed(f"shard {shard}: {reason}", actor_died=False) from None
    except Exception as exc:  # Ray lost the call's result (object lost, owner died): the actor may still
        # be computing it, so it is ended and replaced rather than leased again while busy
        reason = f"actor {member.index}: {type(exc).__name__}: {_first_line(exc)}"
        pool.release(member, dead=True, reason=reason)
        ledger.record(shard, member, "lost", time.perf_counter() - t0, reason)
        raise ShardFailed(f"shard {shard}: {reason}", actor_died=True) from None
    except BaseException:  # cancelled mid-shard: the actor may still compute, it is not leased again
        pool.release(member, dead=True, reason="the attempt was cancelled")
        raise
    pool.release(member)
    ledger.record(shard, member, "ok", time.perf_counter() - t0)
    stats["actor"] = {k: member.info.get(k) for k in ("index", "pid", "host", "gpu_ids")}
    return outcomes, stats


def put_prompts(token_ids: list[np.ndarray]) -> Any:
    """A shard's prompts in Ray's object store: sent once, read by every attempt."""
    import ray

    return ray.put(token_ids)


class _Watcher:
    """Fetches a running actor's progress and log lines, one ``poll`` call in flight at a time."""

    def __init__(
        self,
        member: Member,
        shard: int,
        on_progress: Callable[[int], None],
        on_log: Callable[[Member, str], None],
    ) -> None:
        self.member = member
        self.shard = shard
        self.on_progress = on_progress
        self.on_log = on_log
        self.pending: Any = None

    def poll(self, final: bool = False) -> None:
        """Take the answer of the call in flight, if any, and send the next one. ``final``: the
        shard has ended; wait for a call sent after that, so its last lines are not left behind."""
        for _ in range(2 if final else 1):
            if self.pending is None:
                self.pending = self.member.handle.poll.remote()
            self._take(timeout=FINAL_POLL_S if final else 0.0)

    def _take(self, timeout: float) -> None:
        import ray

        ready, _ = ray.wait([self.pending], timeout=timeout)
        if not ready:
            return
        ref, self.pending = self.pending, None
        try:
            running, done, lines = ray.get(ref)
        except Exception:  # a dead actor: the shard's own call reports it
            return
        try:  # reporting (a log handler, the Prefect API) never fails the shard it reports on
            for line in lines:
                self.on_log(self.member, line)
            if running == self.shard:  # asked before the run began (or after it), the actor answers None
                self.on_progress(done)
        except Exception as exc:
            self.member.info.setdefault("report_errors", []).append(f"{type(exc).__name__}: {exc}"[:200])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
