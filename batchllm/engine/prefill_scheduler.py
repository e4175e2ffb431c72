"""Prefill-only scheduling (PrefillOnly, DESIGN 4.3): shortest cache-miss prefill first, no decode.

A prefill-only sequence (a classify/score request, or a unit of packed
candidates) produces its scores in the forward that computes its last chunk
and then ends, so it never grows and never waits for a decode. Device
independent (no torch); the engine drives it:

    scheduler.add_group(prefix_token_ids, members)
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        ... forward batch.chunks; read the scores of every chunk ...
        done = scheduler.on_step_done(batch)     # finished sequences, their blocks already freed

Policy:
- Each step first continues started sequences (oldest first), then starts
  waiting ones by cost = miss_tokens - lambda x waiting_seconds, lowest first,
  up to ``max_num_batched_tokens``. miss_tokens are the tokens not in the KV
  cache: the member's own tokens, plus its group's prefix when that is not
  resident. Cache hits therefore go first (a resident prefix is finished off
  and released), and the starvation guard lets a long request overtake
  shorter ones once it has waited miss / lambda seconds longer.
- The cost is re-scored at every step: cost(t) = (miss + lambda x arrival) -
  lambda x t, and lambda x t is the same for every waiting request, so a heap
  keyed by (miss + lambda x arrival), updated whenever a miss count changes
  (a prefix becomes resident or is evicted), picks what re-scoring all
  requests at time t would pick.
- A sequence gets all its KV blocks when it starts (its size is known: no
  decode), so steps never preempt. Its own blocks are freed when its last
  chunk has run (its scores are read in that forward); only a group's prefix
  stays, pinned while the group has unfinished members.
- A group's prefix is computed once, before any member starts; a member that
  does not fit waits for running work to end. When nothing runs and the best
  candidate still does not fit, idle resident prefixes (no member running)
  are evicted, least urgent first, and recomputed when needed again.
- A member larger than the whole pool is rejected when added.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass, field

import numpy as np

from batchllm.engine.admission import enroll, shared_prefix_len
from batchllm.engine.kv import BlockPool
from batchllm.engine.outputs import SchedulerStats
from batchllm.engine.scheduler import ScheduleBatch
from batchllm.engine.sequence import ScheduledChunk, Sequence, SequenceStatus, grouped_chunks

STARVATION_LAMBDA = 1000.0  # miss tokens one second of waiting is worth


@dataclass(eq=False)
class _Group:
    group_id: int
    prefix: Sequence | None
    waiting: list[Sequence]  # longest own part first: pop() gives the shortest
    arrival: float
    num_unfinished: int
    num_running: int = 0
    version: int = 0  # bumped when its heap key changes; older heap entries are stale


@dataclass
class _Step:
    budget: int
    chunks: dict[int, ScheduledChunk] = field(default_factory=dict)


class PrefillScheduler:
    """SPF with a starvation guard over one BlockPool; the only writer of block tables and computed lengths."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        *,
        starvation_lambda: float = STARVATION_LAMBDA,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert max_num_batched_tokens > 0 and starvation_lambda >= 0
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.starvation_lambda = starvation_lambda
        self.clock = clock
        self.running: list[Sequence] = []  # started, chunks left, in start order
        self.groups: dict[int, _Group] = {}  # unfinished groups
        self.resident: dict[int, _Group] = {}  # groups whose prefix KV is complete and pinned
        self.heap: list[tuple[float, int, int, int]] = []  # (key, group_id, version, tiebreak)
        self.num_unfinished = 0
        self.rejected: list[Sequence] = []
        self.rejection_reasons: dict[int, str] = {}
        self.stats = SchedulerStats()
        self._next_group_id = 0

    # ---- engine API -----------------------------------------------------------------------

    def add_group(
        self, prefix_token_ids: SequenceLike[int], members: list[Sequence], arrival: float | None = None
    ) -> int:
        """Queue a group (its members share the prefix, cut to whole blocks); returns its group_id."""
        gid = self._next_group_id
        self._next_group_id += 1
        bs = self.block_size
        num_shared = shared_prefix_len(len(prefix_token_ids), (m.num_tokens for m in members), bs)
        prefix_ids = np.asarray(prefix_token_ids[:num_shared], dtype=np.int64)
        accepted = []
        for m in members:
            enroll(m, gid, prefix_ids)
            if (need := self.pool.blocks_for(m.num_tokens)) > self.pool.num_blocks:
                m.status = SequenceStatus.REJECTED
                self.rejected.append(m)
                self.rejection_reasons[m.seq_id] = (
                    f"needs {need} KV blocks, the pool has {self.pool.num_blocks}"
                )
            else:
                accepted.append(m)
        if not accepted:
            return gid
        prefix = None
        if num_shared:
            prefix = Sequence(-1 - gid, None, prefix_ids, num_shared, 0, group_id=gid, is_prefix=True)
        # pop() gives the shortest member, the first submitted among equals
        waiting = [
            m for _, m in sorted(enumerate(accepted), key=lambda t: (t[1].num_tokens, t[0]), reverse=True)
        ]
        now = self.clock() if arrival is None else arrival
        group = _Group(gid, prefix, waiting, now, len(accepted))
        self.groups[gid] = group
        self.num_unfinished += len(accepted)
        self.stats.num_prompt_tokens_logical += sum(m.num_tokens for m in accepted)
        self._push(group)
        return gid

    def has_unfinished(self) -> bool:
        return self.num_unfinished > 0

    def schedule(self) -> ScheduleBatch:
        """Started sequences' next chunks, then new starts by cost, within the token budget."""
        step = _Step(self.max_num_batched_tokens)
        for seq in self.running:
            if step.budget == 0:
                break
            self._add_chunk(seq, step)
        while step.budget > 0 and self._start_next(step):
            pass
        batch = ScheduleBatch(grouped_chunks(step.chunks.values()), self.max_num_batched_tokens - step.budget)
        assert batch.chunks or not self.has_unfinished(), "prefill scheduler made no progress"
        self.stats.peak_kv_blocks = self.pool.peak_used
        return batch

    def on_step_done(self, batch: ScheduleBatch) -> list[Sequence]:
        """Advance computed lengths; members whose last chunk ran end here (blocks freed); returns them."""
        stats = self.stats
        stats.num_steps += 1
        stats.num_tokens += batch.num_tokens
        stats.max_tokens_per_step = max(stats.max_tokens_per_step, batch.num_tokens)
        done: list[Sequence] = []
        for ch in batch.chunks:
            seq = ch.seq
            assert seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == ch.start
            seq.num_computed_tokens = ch.end
            stats.num_prompt_tokens_computed += ch.num_tokens
            if ch.end < seq.num_tokens:
                continue
            group = self.groups[seq.group_id]  # type: ignore[index]
            if seq.is_prefix:
                counts = stats.prefix_computations
                counts[group.group_id] = counts.get(group.group_id, 0) + 1
                seq.status = SequenceStatus.FINISHED
                self.pool.pin(seq.block_table)
                self.resident[group.group_id] = group
                self._push(group)  # its members now miss their own tokens only
            else:
                self._finish(seq, group)
                done.append(seq)
        if any(ch.end == ch.seq.num_tokens for ch in batch.chunks):
            self.running = [s for s in self.running if s.num_computed_tokens < s.num_tokens]
        return done

    def check_integrity(self) -> None:
        """Cross-check block tables against the pool (tests call it after every step)."""
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        holders = self.running + [g.prefix for g in self.resident.values() if g.prefix is not None]
        for seq in holders:
            for b in seq.block_table:
                refs[b] += 1
            if seq.num_shared_tokens and not seq.is_prefix:
                prefix = self.groups[seq.group_id].prefix  # type: ignore[index]
                assert prefix is not None and prefix.status is SequenceStatus.FINISHED
                assert seq.block_table[: seq.num_shared_tokens // self.block_size] == prefix.block_table
        assert refs == self.pool.ref_counts, "block ref counts disagree with block tables"

    # ---- starting work ----------------------------------------------------------------------

    def _key(self, group: _Group) -> float:
        """Cost of the group's next member, less the lambda x now term that all waiting requests share."""
        m = group.waiting[-1]
        miss = m.num_tokens - m.num_shared_tokens
        if group.prefix is not None and group.group_id not in self.resident:
            miss += group.prefix.num_tokens
        return miss + self.starvation_lambda * group.arrival

    def _push(self, group: _Group) -> None:
        group.version += 1
        prefix_busy = group.prefix is not None and group.prefix.status is SequenceStatus.RUNNING
        if group.waiting and not prefix_busy:
            heapq.heappush(self.heap, (self._key(group), group.group_id, group.version, 0))

    def _best(self) -> _Group | None:
        while self.heap:
            _, gid, version, _ = self.heap[0]
            group = self.groups.get(gid)
            if group is not None and group.version == version and group.waiting:
                return group
            heapq.heappop(self.heap)
        return None

    def _start_next(self, step: _Step) -> bool:
        """Start the lowest-cost waiting work (a prefix, or a member); False when nothing can start now."""
        group = self._best()
        if group is None:
            return False
        m, prefix = group.waiting[-1], group.prefix
        own = self.pool.blocks_for(m.num_tokens) - m.num_shared_tokens // self.block_size
        cold = prefix is not None and prefix.status is SequenceStatus.WAITING
        need = own + (self.pool.blocks_for(prefix.num_tokens) if cold else 0)  # type: ignore[union-attr]
        while self.pool.num_free < need:
            if self.running or not self._evict_idle(exclude=group):
                return False
        heapq.heappop(self.heap)
        if cold:
            assert prefix is not None
            prefix.block_table = self.pool.allocate(self.pool.blocks_for(prefix.num_tokens))
            self._run(prefix, step)
            group.version += 1  # members wait for the prefix; re-queued when it is resident
            return True
        group.waiting.pop()
        if prefix is not None:
            m.block_table = list(prefix.block_table)
            self.pool.incref(m.block_table)
        m.block_table += self.pool.allocate(own)
        m.num_computed_tokens = m.num_shared_tokens
        group.num_running += 1
        self._run(m, step)
        self._push(group)
        return True

    def _run(self, seq: Sequence, step: _Step) -> None:
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self._add_chunk(seq, step)

    def _add_chunk(self, seq: Sequence, step: _Step) -> None:
        n = min(seq.num_remaining, step.budget)
        if n > 0:
            step.chunks[seq.seq_id] = ScheduledChunk(seq, seq.num_computed_tokens, n, n == seq.num_remaining)
            step.budget -= n

    # ---- ending work ------------------------------------------------------------------------

    def _finish(self, seq: Sequence, group: _Group) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        group.num_running -= 1
        group.num_unfinished -= 1
        self.num_unfinished -= 1
        if group.num_unfinished == 0:
            if group.group_id in self.resident:
                self._drop_prefix(group)
            del self.groups[group.group_id]

    def _drop_prefix(self, group: _Group) -> None:
        prefix = group.prefix
        assert prefix is not None
        del self.resident[group.group_id]
        self.pool.unpin(prefix.block_table)
        self.pool.release(prefix.block_table)
        prefix.block_table = []

    def _evict_idle(self, exclude: _Group) -> bool:
        """Drop the least urgent resident prefix with no running member; False when there is none."""
        idle = [g for g in self.resident.values() if g.num_running == 0 and g is not exclude]
        if not idle:
            return False
        group = max(idle, key=self._key)
        self.stats.num_prefix_evictions += 1
        self._drop_prefix(group)
        prefix = group.prefix
        assert prefix is not None
        prefix.num_computed_tokens = 0
        prefix.status = SequenceStatus.WAITING
        self._push(group)  # its members miss the prefix again
        return True
