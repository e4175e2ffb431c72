"""The engine-actor pool's leases and the shard watcher, on stand-in actors (no cluster): a retry that
waits behind busy actors takes an idle tried one, a busy pool is waited for rather than failed, and a
watcher reports only its own shard's progress and never fails a shard on a reporting error."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from batchllm.distributed import dispatch, pool
from batchllm.distributed.pool import ActorPool, Member, NoActorError


def _pool(members: list[Member], timeout: float) -> ActorPool:
    p = ActorPool.__new__(ActorPool)  # the lease logic alone: no Ray, no actors started
    p._changed, p._timeout, p.died, p.replacements_left, p.members = (
        threading.Condition(),
        timeout,
        [],
        0,
        members,
    )
    return p


def test_a_retry_takes_an_idle_tried_actor_after_a_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "TRIED_GRACE_S", 0.3)
    members = [Member(i, None, None, info={"pid": i}) for i in range(3)]
    members[1].busy = members[2].busy = True  # the untried actors run long shards
    p = _pool(members, timeout=1.0)
    t0 = time.monotonic()
    assert p.lease(tried={0}).index == 0
    assert 0.3 <= time.monotonic() - t0 < 1.0


def test_busy_actors_are_waited_for_and_unplaced_ones_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    members = [Member(0, None, None, info={"pid": 0}, busy=True)]
    p = _pool(members, timeout=0.2)
    threading.Timer(0.5, lambda: p.release(members[0])).start()
    assert p.lease(tried=set()).index == 0  # busy past the timeout: waited for, not an error
    monkeypatch.setattr(ActorPool, "_refresh", lambda self: None)
    unplaced = _pool([Member(0, None, None)], timeout=0.2)  # never answers info: the cluster cannot place it
    with pytest.raises(NoActorError, match="no engine actor started within"):
        unplaced.lease(tried=set())


def test_the_watcher_reports_its_own_shard_and_survives_reporting_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (refs, []))
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    # a poll answered before the run began says no shard runs (the last one's count still in `done`)
    answers = iter([(None, 10, ["old line"]), (5, 2, ["a"]), (5, 4, []), (5, 6, ["b"])])
    member = Member(0, SimpleNamespace(poll=SimpleNamespace(remote=lambda: next(answers))), None, info={})
    progress: list[int] = []

    def report(done: int) -> None:
        if done == 4:
            raise RuntimeError("the Prefect API is down")
        progress.append(done)

    logs: list[str] = []
    watcher = dispatch._Watcher(member, 5, report, lambda m, line: logs.append(line))
    for _ in range(4):
        watcher.poll()
    assert progress == [2, 6] and logs == ["old line", "a", "b"]
    assert member.info["report_errors"] == ["RuntimeError: the Prefect API is down"]
