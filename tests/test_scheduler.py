"""Scheduler invariants, driven by a simulated executor.

The executor plays the engine: it "computes" each chunk by writing the chunk's
token ids into a fake KV store indexed by the block table, checks that every
position a chunk attends to holds the right token (so a freed, reused or
overwritten prefix block is caught), appends one token per sampled chunk and
finishes sequences at a random EOS, at max_tokens or at max_model_len (the
engine, not the scheduler, decides every ending).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchllm.engine import admission, kv, scheduler
from batchllm.engine.outputs import SchedulerStats
from batchllm.engine.scheduler import ScheduleBatch, Scheduler
from batchllm.engine.sequence import Sequence, SequenceStatus

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class GroupSpec:
    prefix_len: int
    suffix_lens: list[int]
    max_tokens: list[int]


@dataclass
class Workload:
    block_size: int
    groups: list[GroupSpec]
    seed: int = 0
    prompts: list[list[list[int]]] = field(default_factory=list)  # per group, per member

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        for g in self.groups:
            prefix = [rng.randrange(1000) for _ in range(g.prefix_len)]
            self.prompts.append([prefix + [rng.randrange(1000) for _ in range(n)] for n in g.suffix_lens])

    def shared_len(self, gi: int) -> int:
        """The prefix the scheduler can share: whole blocks, leaving each member a token of its own."""
        g = self.groups[gi]
        n = min(g.prefix_len, *(g.prefix_len + s - 1 for s in g.suffix_lens))
        return n // self.block_size * self.block_size

    def blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def request_blocks(self, gi: int, mi: int) -> int:
        """Blocks a request needs at most (its shared prefix included)."""
        return self.blocks(len(self.prompts[gi][mi]) + self.groups[gi].max_tokens[mi] - 1)

    def group_blocks(self, gi: int) -> int:
        """The whole-group estimate: prefix + members x (suffix + max_tokens)."""
        shared = self.shared_len(gi) // self.block_size
        return shared + sum(self.request_blocks(gi, mi) - shared for mi in range(len(self.prompts[gi])))

    def physical_prompt_tokens(self) -> int:
        total = 0
        for gi, prompts in enumerate(self.prompts):
            shared = self.shared_len(gi)
            total += shared + sum(len(p) - shared for p in prompts)
        return total

    def logical_prompt_tokens(self) -> int:
        return sum(len(p) for prompts in self.prompts for p in prompts)


@dataclass
class RunResult:
    stats: SchedulerStats
    finished: dict[int, Sequence]
    first_step_of_group: dict[int, int]
    num_steps: int


def build(workload: Workload, scheduler: Scheduler) -> list[Sequence]:
    seqs = []
    for gi, prompts in enumerate(workload.prompts):
        members = []
        for mi, prompt in enumerate(prompts):
            seq = Sequence(
                len(seqs), len(seqs), list(prompt), len(prompt), workload.groups[gi].max_tokens[mi]
            )
            seq.num_shared_tokens = workload.groups[gi].prefix_len
            members.append(seq)
            seqs.append(seq)
        scheduler.add_group(prompts[0][: workload.groups[gi].prefix_len], members)
    return seqs


def simulate(scheduler: Scheduler, seqs: list[Sequence], eos_prob: float, seed: int) -> RunResult:
    """Play the engine until the scheduler is done, checking invariants after every step."""
    rng = random.Random(seed)
    bs = scheduler.block_size
    kv = np.full((scheduler.pool.num_blocks, bs), -1, dtype=np.int64)
    finished: dict[int, Sequence] = {}
    first_step: dict[int, int] = {}
    rejected = {s.seq_id for s in scheduler.rejected}
    bound = 50 * sum(s.num_prompt_tokens + s.max_tokens for s in seqs) + 100
    step = 0
    while scheduler.has_unfinished():
        step += 1
        assert step < bound, "scheduler does not terminate"
        batch = scheduler.schedule()
        assert batch.chunks, "no progress while requests are unfinished"
        assert batch.num_tokens == sum(c.num_tokens for c in batch.chunks) <= scheduler.max_num_batched_tokens
        assert len({c.seq.seq_id for c in batch.chunks}) == len(batch.chunks)
        assert_grouped(batch)
        scheduler.check_integrity()
        for c in batch.chunks:
            seq = c.seq
            assert seq.status is SequenceStatus.RUNNING and c.num_tokens > 0
            assert c.start == seq.num_computed_tokens and c.end <= seq.num_tokens
            assert c.sample == (not seq.is_prefix and c.end == seq.num_tokens)
            assert len(seq.block_table) * bs >= c.end, "blocks must be allocated before the step"
            if not seq.is_prefix:
                assert c.start >= seq.num_shared_tokens, "a member recomputes its group prefix"
            first_step.setdefault(seq.group_id, step)
            for pos in range(c.start, c.end):  # "compute": write this chunk's KV
                kv[seq.block_table[pos // bs], pos % bs] = seq.token_ids[pos]
        for c in batch.chunks:  # attention reads every earlier position of the sequence
            seq = c.seq
            for pos in range(c.end):
                assert kv[seq.block_table[pos // bs], pos % bs] == seq.token_ids[pos], (
                    f"seq {seq.seq_id}: KV at position {pos} lost (block freed or reused while needed)"
                )
        eos = set()
        for c in batch.chunks:
            if c.sample:
                c.seq.token_ids.append(rng.randrange(1000))
                if rng.random() < eos_prob or reached_limit(c.seq, scheduler.max_model_len):
                    eos.add(c.seq.seq_id)
        for seq in scheduler.on_step_done(batch, eos):
            assert seq.seq_id not in finished, "a request finished twice"
            limit = seq.num_generated == seq.max_tokens or seq.num_tokens >= scheduler.max_model_len
            assert seq.seq_id in eos or limit
            assert seq.status is SequenceStatus.FINISHED and not seq.block_table
            finished[seq.seq_id] = seq
        assert scheduler.pool.num_used <= scheduler.pool.num_blocks
        scheduler.check_integrity()
    assert set(finished) | rejected == {s.seq_id for s in seqs} and not set(finished) & rejected
    pool = scheduler.pool
    assert pool.num_free == pool.num_blocks, "KV blocks leaked"
    assert not any(pool.ref_counts) and not any(pool.pin_counts)
    adm = scheduler.admission
    assert adm.num_reserved == 0 and adm.num_active == 0 and not scheduler.running
    assert not adm.groups and not scheduler.resident and not adm.pending and not adm.fresh
    return RunResult(scheduler.stats, finished, first_step, step)


def reached_limit(seq: Sequence, max_model_len: int) -> bool:
    return seq.num_generated >= seq.max_tokens or seq.num_tokens >= max_model_len


def assert_grouped(batch: ScheduleBatch) -> None:
    """Plain chunks first, then each group's chunks contiguously by ascending group id (the runner's layout)."""
    shared = [c.seq.num_shared_tokens > 0 for c in batch.chunks]
    assert shared == sorted(shared), "a plain chunk after a grouped one"
    gids = [c.seq.group_id for c in batch.chunks if c.seq.num_shared_tokens > 0]
    assert gids == sorted(gids), "a group's chunks are not contiguous"


@st.composite
def workloads(draw: st.DrawFn, max_groups: int = 6) -> Workload:
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    groups = []
    for _ in range(draw(st.integers(1, max_groups))):
        n = draw(st.integers(1, 5))
        groups.append(
            GroupSpec(
                prefix_len=draw(st.sampled_from([0, draw(st.integers(1, 40))])),
                suffix_lens=draw(st.lists(st.integers(1, 12), min_size=n, max_size=n)),
                max_tokens=draw(st.lists(st.integers(1, 12), min_size=n, max_size=n)),
            )
        )
    return Workload(block_size, groups, seed=draw(st.integers(0, 2**16)))


def max_request_blocks(w: Workload) -> int:
    return max(w.request_blocks(gi, mi) for gi in range(len(w.groups)) for mi in range(len(w.prompts[gi])))


@PROPERTY
@given(
    w=workloads(),
    extra_blocks=st.integers(0, 60),
    budget=st.integers(1, 64),
    eos_prob=st.sampled_from([0.0, 0.2]),
    decode_fraction=st.sampled_from([1.0, 0.5, 0.1]),
    len_slack=st.sampled_from([0, 3, 1000]),
    seed=st.integers(0, 1000),
)
def test_every_request_finishes_once_without_leaks(
    w: Workload,
    extra_blocks: int,
    budget: int,
    eos_prob: float,
    decode_fraction: float,
    len_slack: int,
    seed: int,
) -> None:
    """Any pool that holds the largest request: all finish (at EOS, max_tokens or max_model_len),
    tokens per step within budget, no leaks."""
    num_blocks = max_request_blocks(w) + extra_blocks
    max_model_len = max(len(p) for prompts in w.prompts for p in prompts) + len_slack
    sched = Scheduler(num_blocks, w.block_size, budget, max_model_len, decode_fraction=decode_fraction)
    seqs = build(w, sched)
    assert not sched.rejected
    result = simulate(sched, seqs, eos_prob, seed)
    assert result.stats.max_tokens_per_step <= budget
    assert result.stats.peak_kv_blocks <= num_blocks
    assert result.stats.num_prompt_tokens_logical == w.logical_prompt_tokens()
    assert result.stats.num_prompt_tokens_computed >= w.physical_prompt_tokens()


@PROPERTY
@given(
    w=workloads(), slack=st.integers(0, 8), budget=st.integers(4, 64), eos_prob=st.sampled_from([0.0, 0.3])
)
def test_prefix_computed_once_when_groups_fit_whole(
    w: Workload, slack: int, budget: int, eos_prob: float
) -> None:
    """A pool that holds the largest group (not all of them): no preemption, each prefix computed once,
    achieved saving ratio equals the planned one, and groups start in plan order."""
    num_blocks = max(w.group_blocks(gi) for gi in range(len(w.groups))) + slack
    sched = Scheduler(num_blocks, w.block_size, budget, 1024, watermark=0.0)
    seqs = build(w, sched)
    result = simulate(sched, seqs, eos_prob, seed=1)
    stats = result.stats
    assert stats.num_preemptions == 0 and stats.num_prefix_evictions == 0
    with_prefix = {gi for gi in range(len(w.groups)) if w.shared_len(gi) > 0}
    assert stats.prefix_computations == dict.fromkeys(with_prefix, 1)
    assert stats.num_prompt_tokens_computed == w.physical_prompt_tokens()
    planned = 1 - w.physical_prompt_tokens() / w.logical_prompt_tokens()
    assert abs(stats.saving_ratio - planned) < 1e-12
    order = [result.first_step_of_group[gi] for gi in range(len(w.groups))]
    assert order == sorted(order), "groups must start in plan order"


@PROPERTY
@given(
    w=workloads(),
    slack=st.integers(0, 30),
    budget=st.integers(1, 64),
    eos_prob=st.sampled_from([0.0, 0.3]),
    watermark=st.sampled_from([0.0, 0.01, 0.2]),
)
def test_upper_bound_estimates_never_preempt(
    w: Workload, slack: int, budget: int, eos_prob: float, watermark: float
) -> None:
    """With max_tokens estimates any pool that holds the largest request runs without preemption;
    groups too large to fit whole are admitted member by member and still compute their prefix once."""
    sched = Scheduler(max_request_blocks(w) + slack, w.block_size, budget, 1024, watermark=watermark)
    seqs = build(w, sched)
    stats = simulate(sched, seqs, eos_prob, seed=2).stats
    assert stats.num_preemptions == 0 and stats.num_prefix_evictions == 0
    with_prefix = {gi for gi in range(len(w.groups)) if w.shared_len(gi) > 0}
    assert stats.prefix_computations == dict.fromkeys(with_prefix, 1)
    assert stats.num_prompt_tokens_computed == w.physical_prompt_tokens()


@PROPERTY
@given(w=workloads(max_groups=4), budget=st.integers(1, 16), seed=st.integers(0, 1000))
def test_tiny_pools_preempt_without_deadlock(w: Workload, budget: int, seed: int) -> None:
    """The pool holds exactly the largest request and admission is optimistic: preemption must resolve it."""
    sched = Scheduler(max_request_blocks(w), w.block_size, budget, 1024, watermark=0.0, decode_fraction=0.05)
    seqs = build(w, sched)
    result = simulate(sched, seqs, eos_prob=0.0, seed=seed)
    assert all(s.num_generated == s.max_tokens for s in result.finished.values())


def test_tiny_pool_forces_preemption_and_prefix_eviction() -> None:
    """Deterministic case for the last-resort paths: members preempted and an idle prefix evicted."""
    groups = [
        GroupSpec(8, [2, 6, 4, 3], [9, 9, 7, 7]),
        GroupSpec(4, [3, 2, 6, 5], [5, 9, 13, 13]),
        GroupSpec(4, [3, 1], [10, 14]),
    ]
    w = Workload(4, groups, seed=50)
    sched = Scheduler(6, 4, 4, 1024, watermark=0.0, decode_fraction=0.05)
    seqs = build(w, sched)
    result = simulate(sched, seqs, eos_prob=0.0, seed=0)
    assert result.stats.num_preemptions > 0 and result.stats.num_prefix_evictions > 0
    assert max(result.stats.prefix_computations.values()) > 1
    assert sum(s.num_preemptions for s in seqs) > 0
    assert all(s.num_generated == s.max_tokens for s in seqs)


def test_group_too_large_is_admitted_member_by_member() -> None:
    """A group whose estimate exceeds the pool runs members a few at a time over one pinned prefix."""
    w = Workload(4, [GroupSpec(32, [4] * 20, [8] * 20), GroupSpec(16, [4] * 3, [4] * 3)], seed=5)
    num_blocks = w.group_blocks(0) // 3
    assert w.group_blocks(0) > num_blocks >= w.group_blocks(1)
    sched = Scheduler(num_blocks, 4, 64, 1024, watermark=0.0)
    seqs = build(w, sched)
    most_running = 0
    orig = sched.on_step_done

    def spy(batch, finished):
        nonlocal most_running
        most_running = max(most_running, sum(1 for s in sched.running if not s.is_prefix))
        return orig(batch, finished)

    sched.on_step_done = spy  # type: ignore[method-assign]
    result = simulate(sched, seqs, eos_prob=0.0, seed=0)
    assert result.stats.prefix_computations == {0: 1, 1: 1}
    assert result.stats.num_preemptions == 0
    assert 1 < most_running < 20
    assert result.stats.num_prompt_tokens_computed == w.physical_prompt_tokens()


def test_request_larger_than_pool_is_rejected_not_hung() -> None:
    sched = Scheduler(8, 4, 16, 1024)
    big = Sequence(0, 0, list(range(40)), 40, 4)
    ok = Sequence(1, 1, list(range(5)), 5, 3)
    sched.add_group([], [big])
    sched.add_group([], [ok])
    assert sched.rejected == [big] and big.status is SequenceStatus.REJECTED
    assert "8" in sched.rejection_reasons[0]
    result = simulate(sched, [big, ok], eos_prob=0.0, seed=0)
    assert set(result.finished) == {1}
    too_long = Sequence(2, 2, list(range(30)), 30, 1)
    sched2 = Scheduler(64, 4, 16, max_model_len=20)
    sched2.add_group([], [too_long])
    assert sched2.rejected == [too_long] and not sched2.has_unfinished()


def test_decodes_come_first_then_chunked_prefill() -> None:
    sched = Scheduler(64, 4, 10, 1024)
    a = Sequence(0, 0, list(range(6)), 6, 5)
    b = Sequence(1, 1, list(range(100, 125)), 25, 5)
    sched.add_group([], [a])
    batch = sched.schedule()
    assert [(c.seq.seq_id, c.start, c.num_tokens, c.sample) for c in batch.chunks] == [(0, 0, 6, True)]
    a.token_ids.append(7)
    sched.on_step_done(batch, set())
    sched.add_group([], [b])
    batch = sched.schedule()
    # a's decode first, then b's prompt chunked to the remaining budget
    assert [(c.seq.seq_id, c.start, c.num_tokens, c.sample) for c in batch.chunks] == [
        (0, 6, 1, True),
        (1, 0, 9, False),
    ]
    assert batch.num_tokens == 10


def test_members_wait_for_the_prefix_and_share_its_blocks() -> None:
    sched = Scheduler(64, 4, 6, 1024)
    prefix = list(range(10))
    members = [Sequence(i, i, [*prefix, 50 + i, 60 + i], 12, 2) for i in range(3)]
    sched.add_group(prefix, members)
    assert all(m.num_shared_tokens == 8 for m in members)  # cut to whole blocks
    batch = sched.schedule()
    assert [(c.seq.is_prefix, c.start, c.num_tokens) for c in batch.chunks] == [(True, 0, 6)]
    sched.on_step_done(batch)
    batch = sched.schedule()
    assert [(c.seq.is_prefix, c.start, c.num_tokens) for c in batch.chunks] == [(True, 6, 2)]
    sched.on_step_done(batch)
    batch = sched.schedule()
    assert [(c.seq.seq_id, c.start, c.num_tokens) for c in batch.chunks] == [(0, 8, 4), (1, 8, 2)]
    tables = [m.block_table[:2] for m in members[:2]]
    assert tables[0] == tables[1] and all(sched.pool.is_pinned(b) for b in tables[0])
    assert sched.stats.prefix_computations == {0: 1}


def count_lines(fn: Callable[[], Any], modules: tuple[Any, ...]) -> int:
    """Python lines executed inside ``modules`` while fn runs: a work count that ignores machine noise."""
    files = {m.__file__ for m in modules}
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        count += event == "line"
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename in files else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


@pytest.mark.slow
def test_ten_thousand_requests_scale_linearly() -> None:
    """Per-step work is bounded by running + admitted work, not by the number of queued requests."""

    def run(num_groups: int) -> None:
        sched = Scheduler(512, 16, 1024, 4096)  # holds ~23 groups at a time: hundreds of steps
        sid = 0
        for g in range(num_groups):
            prefix = [g] * 32
            members = []
            for k in range(10):
                members.append(Sequence(sid, sid, [*prefix, k, k + 1], 34, 16))
                sid += 1
            sched.add_group(prefix, members)
        num_finished = 0
        while sched.has_unfinished():
            batch = sched.schedule()
            ended = []
            for c in batch.chunks:
                if c.sample:
                    c.seq.token_ids.append(0)
                    if reached_limit(c.seq, sched.max_model_len):
                        ended.append(c.seq.seq_id)
            num_finished += len(sched.on_step_done(batch, ended))
        assert num_finished == sid and sched.pool.num_free == 512
        assert sched.stats.prefix_computations == dict.fromkeys(range(num_groups), 1)

    modules = (scheduler, admission, kv)
    small, large = (
        count_lines(lambda: run(250), modules),
        count_lines(lambda: run(1000), modules),
    )  # 2.5k, 10k
    assert large / small < 4.2, f"4x the requests took {large / small:.2f}x the scheduler work"


def test_a_head_may_end_a_sequence_without_a_token() -> None:
    """Classification ends a request with its one forward: no token is appended, its blocks are freed."""
    sched = Scheduler(16, 4, 64, 1024)
    seqs = [Sequence(i, i, list(range(10 * i, 10 * i + 9)), 9, 1) for i in range(2)]
    sched.add_group([], seqs)
    batch = sched.schedule()
    assert all(c.sample for c in batch.chunks)
    done = sched.on_step_done(batch, [s.seq_id for s in seqs])
    assert done == seqs and all(s.num_generated == 0 for s in seqs)
    assert not sched.has_unfinished() and sched.pool.num_free == 16


def test_finish_outside_a_step() -> None:
    """A running sequence the engine learns has ended after the step it ran in (pipelined decode,
    when it is not in the next step) finishes outside a step: blocks freed, no longer scheduled."""
    sched = Scheduler(16, 4, 64, 1024)
    a, b = (Sequence(i, i, list(range(10 * i, 10 * i + 5)), 5, 8) for i in range(2))
    sched.add_group([], [a, b])
    batch = sched.schedule()
    a.token_ids.append(1)
    b.token_ids.append(2)
    assert sched.on_step_done(batch, []) == []
    assert sched.finish([a]) == [a] and a.status is SequenceStatus.FINISHED
    assert [c.seq for c in sched.schedule().chunks] == [b]
    sched.check_integrity()
    assert sched.pool.num_free == 16 - 2
