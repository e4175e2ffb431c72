"""BatchLLM scheduling: groups with a shared prefix, admission bounded by KV
memory, memory-centric token batching with chunked prefill, preemption by
recompute. Device independent (no torch); the engine drives it:

    scheduler.add_group(prefix_token_ids, members)       # groups in plan order
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        ... forward batch.chunks; append one sampled token per `sample` chunk ...
        finished = scheduler.on_step_done(batch, finished_seq_ids)

Policy:
- Admission follows plan order and never skips ahead. A group is admitted whole
  (its prefix and all waiting members reserve their estimated KV blocks) when
  the estimate fits the pool; a group that can never fit whole is admitted
  prefix first, then member by member as reservations free up. The estimate
  of a member is its prompt suffix plus max_tokens (scaled by
  ``decode_fraction``); with the default 1.0 it is an upper bound, so nothing
  is ever preempted and each prefix is computed once.
- A prefix is prefilled once (no output); when its KV is complete its blocks
  are pinned and its admitted members start from position num_shared_tokens,
  sharing those blocks. The pin is dropped after the group's last member.
- Each step takes every running decode first, then prefill chunks of running
  sequences in admission order, then newly admitted work, up to
  ``max_num_batched_tokens``.
- When blocks run out (only with ``decode_fraction`` < 1), the newest running
  sequence is preempted and later recomputed from its group's prefix. The
  oldest running sequence is never preempted: once alone it may evict idle
  pinned prefixes (groups with no running member), so it always progresses.
  A request that cannot fit the pool alone is rejected in ``add_group``.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass, field

from batchllm.engine.kv import BlockPool
from batchllm.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True, eq=False)
class ScheduledChunk:
    """Compute KV for positions [start, start + num_tokens) of seq; sample the next token when ``sample``."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class ScheduleBatch:
    """One step: decode chunks first, then prefill chunks. Blocks for every chunk are allocated."""

    chunks: list[ScheduledChunk]
    num_tokens: int


@dataclass
class SchedulerStats:
    """Per-run counters. Prompt tokens are positions < num_prompt_tokens (a group prefix counts once per compute)."""

    num_steps: int = 0
    num_tokens: int = 0
    max_tokens_per_step: int = 0
    num_prompt_tokens_logical: int = 0
    num_prompt_tokens_computed: int = 0
    peak_kv_blocks: int = 0
    num_preemptions: int = 0
    num_prefix_evictions: int = 0
    # group_id -> how many times its prefix prefill ran from position 0 (1 unless preempted or evicted)
    prefix_computations: dict[int, int] = field(default_factory=dict)

    @property
    def mean_tokens_per_step(self) -> float:
        return self.num_tokens / self.num_steps if self.num_steps else 0.0

    @property
    def saving_ratio(self) -> float:
        if not self.num_prompt_tokens_logical:
            return 0.0
        return 1.0 - self.num_prompt_tokens_computed / self.num_prompt_tokens_logical


class _Group:
    """A shared prefix (None for plain requests) and its members' admission state."""

    __slots__ = (
        "admitted",
        "group_id",
        "is_queued",
        "num_running",
        "num_unfinished",
        "prefix",
        "waiting",
        "waiting_blocks",
    )

    def __init__(self, group_id: int, prefix: Sequence | None, members: list[Sequence]) -> None:
        self.group_id = group_id
        self.prefix = prefix
        self.waiting: deque[Sequence] = deque()  # not admitted (or preempted), in priority order
        self.waiting_blocks = 0  # sum of the waiting members' estimates
        self.admitted: list[Sequence] = []  # admitted, waiting for the prefix KV
        self.num_running = 0
        self.num_unfinished = len(members)
        self.is_queued = False

    def __lt__(self, other: _Group) -> bool:
        return self.group_id < other.group_id


@dataclass
class _Step:
    budget: int
    chunks: dict[int, ScheduledChunk] = field(default_factory=dict)  # seq_id -> chunk, in batch order


class Scheduler:
    """BatchLLM policy over one BlockPool; the only writer of block tables and computed lengths."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        *,
        watermark: float = 0.01,
        decode_fraction: float = 1.0,
    ) -> None:
        assert max_num_batched_tokens > 0 and max_model_len > 0
        assert 0.0 <= watermark < 1.0 and 0.0 < decode_fraction <= 1.0
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.decode_fraction = decode_fraction
        self.capacity = num_blocks - int(watermark * num_blocks)  # admission safety margin
        self.fresh: deque[_Group] = deque()  # never touched by admission, plan order
        self.pending: list[_Group] = []  # heap by group_id: groups with waiting members
        self.running: list[Sequence] = []  # holding blocks, in admission order (= priority)
        self.groups: dict[int, _Group] = {}  # unfinished groups
        self.resident: dict[int, _Group] = {}  # groups whose prefix KV is complete and pinned
        self.reserved: dict[int, int] = {}  # seq_id -> estimated blocks reserved at admission
        self.num_reserved = 0
        self.num_active = 0  # admitted unfinished members (running or waiting for their prefix)
        self.num_unfinished = 0
        self.rejected: list[Sequence] = []
        self.rejection_reasons: dict[int, str] = {}  # seq_id -> why it can never run
        self.stats = SchedulerStats()
        self._next_group_id = 0

    # ---- engine API ---------------------------------------------------------------

    def add_group(self, prefix_token_ids: SequenceLike[int], members: list[Sequence]) -> int:
        """Queue a group after all earlier ones; returns its group_id.

        Sets each member's group_id and num_shared_tokens: the prefix is cut to
        whole blocks and to leave every member at least one token of its own.
        Members that can never fit are rejected (``rejected``) and never run.
        """
        gid = self._next_group_id
        self._next_group_id += 1
        bs = self.block_size
        num_shared = min([len(prefix_token_ids), *(m.num_prompt_tokens - 1 for m in members)])
        num_shared = num_shared // bs * bs
        prefix_ids = [int(t) for t in prefix_token_ids[:num_shared]]
        accepted: list[Sequence] = []
        for m in members:
            assert not m.is_prefix and m.status is SequenceStatus.WAITING and not m.block_table
            assert m.token_ids[:num_shared] == prefix_ids, "member does not start with the group prefix"
            m.group_id, m.num_shared_tokens = gid, num_shared
            need = self.pool.blocks_for(self._kv_tokens(m, 1.0))
            if m.num_prompt_tokens > self.max_model_len:
                self._reject(
                    m, f"prompt has {m.num_prompt_tokens} tokens, max_model_len is {self.max_model_len}"
                )
            elif need > self.pool.num_blocks:
                self._reject(m, f"needs {need} KV blocks, the pool has {self.pool.num_blocks}")
            else:
                accepted.append(m)
        if not accepted:
            return gid
        prefix = None
        if num_shared:
            prefix = Sequence(-1 - gid, None, prefix_ids, num_shared, 0, group_id=gid, is_prefix=True)
        group = _Group(gid, prefix, accepted)
        for m in accepted:
            self._push_waiting(group, m, front=False)
        self.groups[gid] = group
        self.fresh.append(group)
        self.num_unfinished += len(accepted)
        self.stats.num_prompt_tokens_logical += sum(m.num_prompt_tokens for m in accepted)
        return gid

    def has_unfinished(self) -> bool:
        return self.num_unfinished > 0

    def schedule(self) -> ScheduleBatch:
        """Running decodes, then running prefill chunks, then new admissions, within the token budget."""
        step = _Step(self.max_num_batched_tokens)
        running, bs = self.running, self.block_size
        i = 0
        while i < len(running) and step.budget > 0:  # decode
            seq = running[i]
            if seq.num_remaining == 1:
                if len(seq.block_table) * bs < seq.num_tokens and not self._make_room(seq, step):
                    break  # seq was the newest running sequence and preempted itself
                self._add_chunk(seq, 1, step)
            i += 1
        i = 0
        while i < len(running) and step.budget > 0:  # prefill
            seq = running[i]
            if seq.seq_id not in step.chunks and not self._schedule_prefill(seq, step):
                break
            i += 1
        self._admit(step)
        batch = ScheduleBatch(list(step.chunks.values()), self.max_num_batched_tokens - step.budget)
        assert batch.chunks or not self.has_unfinished(), "scheduler made no progress"
        self.stats.peak_kv_blocks = self.pool.peak_used
        return batch

    def on_step_done(self, batch: ScheduleBatch, finished_seq_ids: Iterable[int] = ()) -> list[Sequence]:
        """Advance computed lengths and finish sequences; returns every sequence finished by this step.

        The engine must have appended exactly one token to each ``sample`` chunk's
        sequence. A sampled sequence finishes when the engine lists it (EOS, stop),
        or at max_tokens or max_model_len.
        """
        finished_ids = set(finished_seq_ids)
        stats = self.stats
        stats.num_steps += 1
        stats.num_tokens += batch.num_tokens
        stats.max_tokens_per_step = max(stats.max_tokens_per_step, batch.num_tokens)
        done: list[Sequence] = []
        changed = False
        for ch in batch.chunks:
            seq, start, end = ch.seq, ch.start, ch.end
            assert seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == start
            seq.num_computed_tokens = end
            num_prompt = max(0, min(end, seq.num_prompt_tokens) - start)
            stats.num_prompt_tokens_computed += num_prompt
            if seq.is_prefix:
                group = self._group_of(seq)
                if start == 0:
                    counts = stats.prefix_computations
                    counts[group.group_id] = counts.get(group.group_id, 0) + 1
                if seq.num_computed_tokens == seq.num_tokens:
                    self._prefix_ready(group)
                    changed = True
            elif ch.sample:
                num_tokens = len(seq.token_ids)
                assert num_tokens == end + 1, "the engine appends one token per sampled chunk"
                if (
                    seq.seq_id in finished_ids
                    or num_tokens - seq.num_prompt_tokens >= seq.max_tokens
                    or num_tokens >= self.max_model_len
                ):
                    finished_ids.discard(seq.seq_id)
                    self._finish(seq)
                    done.append(seq)
                    changed = True
        assert not finished_ids, f"finished ids that were not sampled this step: {sorted(finished_ids)}"
        if changed:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        return done

    def check_integrity(self) -> None:
        """Cross-check block tables against the pool (tests call it after every step)."""
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        holders = self.running + [g.prefix for g in self.resident.values() if g.prefix is not None]
        for seq in holders:
            assert seq.num_computed_tokens <= len(seq.block_table) * self.block_size
            for b in seq.block_table:
                refs[b] += 1
            if seq.num_shared_tokens:
                prefix = self._group_of(seq).prefix
                assert prefix is not None and prefix.status is SequenceStatus.FINISHED
                shared = seq.block_table[: seq.num_shared_tokens // self.block_size]
                assert shared == prefix.block_table
                assert all(self.pool.is_pinned(b) for b in shared), "a member's prefix block is not pinned"
        assert refs == self.pool.ref_counts, "block ref counts disagree with block tables"
        assert self.num_reserved == sum(self.reserved.values())

    # ---- admission ----------------------------------------------------------------

    def _admit(self, step: _Step) -> None:
        """Admit groups in plan order while their estimates fit; stop at the first that does not."""
        while step.budget > 0:
            if not self.pending:
                if not self.fresh:
                    return
                self._queue(self.fresh.popleft())
            group = self.pending[0]
            if not self._admit_group(group, step):
                return
            heapq.heappop(self.pending)
            group.is_queued = False

    def _admit_group(self, group: _Group, step: _Step) -> bool:
        """Admit what fits of group; True when none of its members is left waiting."""
        prefix = group.prefix
        if prefix is not None and prefix.status is SequenceStatus.WAITING:
            prefix_blocks = self._estimate(prefix)
            whole = prefix_blocks + group.waiting_blocks
            first = prefix_blocks + self._estimate(group.waiting[0])
            if self._fits(whole):
                for m in group.waiting:
                    self._reserve(m)
                group.admitted.extend(group.waiting)
                group.waiting.clear()
                group.waiting_blocks = 0
            elif not ((whole > self.capacity or self.num_active == 0) and self._fits(first, force=True)):
                return False
            # else: too large to fit whole (or nothing else can free memory): prefix, then members one by one
            self._reserve(prefix)
            prefix.status = SequenceStatus.RUNNING
            self.running.append(prefix)
            if not self._schedule_prefill(prefix, step):
                return False
        while group.waiting:
            m = group.waiting[0]
            est = self._estimate(m)
            if step.budget == 0 or not self._fits(est, force=True):
                return False
            group.waiting.popleft()
            group.waiting_blocks -= est
            self._reserve(m)
            if prefix is None or prefix.status is SequenceStatus.FINISHED:
                self._start(m)
                if not self._schedule_prefill(m, step):
                    return False  # no blocks even for its first chunk: wait for running work
            else:
                group.admitted.append(m)
        return True

    def _fits(self, num_blocks: int, force: bool = False) -> bool:
        # force: with no member active nothing would ever free reservations, so admit one anyway
        return self.num_reserved + num_blocks <= self.capacity or (force and self.num_active == 0)

    def _estimate(self, seq: Sequence) -> int:
        """Blocks seq is expected to add beyond its group's shared prefix."""
        if seq.is_prefix:
            return seq.num_tokens // self.block_size
        num_kv = self._kv_tokens(seq, self.decode_fraction)
        return self.pool.blocks_for(num_kv) - seq.num_shared_tokens // self.block_size

    def _kv_tokens(self, seq: Sequence, decode_fraction: float) -> int:
        """KV positions of seq once it has generated decode_fraction x max_tokens (the last token needs none)."""
        decode = math.ceil(decode_fraction * seq.max_tokens)
        return min(max(seq.num_prompt_tokens + decode - 1, seq.num_tokens), self.max_model_len)

    def _reserve(self, seq: Sequence) -> None:
        est = self._estimate(seq)
        self.reserved[seq.seq_id] = est
        self.num_reserved += est
        if not seq.is_prefix:
            self.num_active += 1

    def _unreserve(self, seq: Sequence) -> None:
        self.num_reserved -= self.reserved.pop(seq.seq_id)
        if not seq.is_prefix:
            self.num_active -= 1

    def _queue(self, group: _Group) -> None:
        if not group.is_queued:
            group.is_queued = True
            heapq.heappush(self.pending, group)

    def _push_waiting(self, group: _Group, seq: Sequence, front: bool) -> None:
        if front:
            group.waiting.appendleft(seq)
        else:
            group.waiting.append(seq)
        group.waiting_blocks += self._estimate(seq)

    # ---- running ------------------------------------------------------------------

    def _group_of(self, seq: Sequence) -> _Group:
        assert seq.group_id is not None
        return self.groups[seq.group_id]

    def _start(self, m: Sequence) -> None:
        """Give an admitted member its shared prefix blocks and make it runnable."""
        group = self._group_of(m)
        prefix = group.prefix
        if prefix is not None:
            m.block_table = list(prefix.block_table)
            self.pool.incref(m.block_table)
        m.num_computed_tokens = m.num_shared_tokens
        m.status = SequenceStatus.RUNNING
        group.num_running += 1
        self.running.append(m)

    def _schedule_prefill(self, seq: Sequence, step: _Step) -> bool:
        """Schedule the next prefill chunk of seq, shrunk to the free blocks; False if seq was preempted."""
        n = min(seq.num_remaining, step.budget, self._free_tokens(seq))
        if n <= 0 < step.budget:
            if not self._make_room(seq, step):
                return False
            n = min(seq.num_remaining, step.budget, self._free_tokens(seq))
        if n > 0:
            self._add_chunk(seq, n, step)
        return True

    def _free_tokens(self, seq: Sequence) -> int:
        """Positions seq could compute from num_computed_tokens without preempting anyone."""
        return (len(seq.block_table) + self.pool.num_free) * self.block_size - seq.num_computed_tokens

    def _add_chunk(self, seq: Sequence, n: int, step: _Step) -> None:
        start = seq.num_computed_tokens
        need = self.pool.blocks_for(start + n) - len(seq.block_table)
        if need > 0:
            seq.block_table.extend(self.pool.allocate(need))
        sample = not seq.is_prefix and start + n == seq.num_tokens
        step.chunks[seq.seq_id] = ScheduledChunk(seq, start, n, sample)
        step.budget -= n

    def _make_room(self, seq: Sequence, step: _Step) -> bool:
        """Free a block for seq by preempting newer running sequences; False if seq itself had to go."""
        while self.pool.num_free == 0:
            if self.running[-1] is not seq:
                self._preempt(self.running.pop(), step)
            elif len(self.running) > 1:
                self._preempt(self.running.pop(), step)
                return False
            else:
                group = self._idle_resident_group(exclude=seq.group_id)
                assert group is not None, "KV pool cannot hold a single admitted sequence"
                self._evict_prefix(group)
        return True

    def _preempt(self, seq: Sequence, step: _Step) -> None:
        """Drop seq's KV (recomputed when it is admitted again) and put it back at the front of its group."""
        chunk = step.chunks.pop(seq.seq_id, None)
        if chunk is not None:
            step.budget += chunk.num_tokens
        group = self._group_of(seq)
        self.stats.num_preemptions += 1
        seq.num_preemptions += 1
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        if seq.is_prefix:
            for m in reversed(group.admitted):
                self._unreserve(m)
                self._push_waiting(group, m, front=True)
            group.admitted.clear()
        else:
            group.num_running -= 1
            self._push_waiting(group, seq, front=True)
        self._queue(group)

    def _release(self, seq: Sequence) -> None:
        """Drop seq's block references and its reservation."""
        self.pool.release(seq.block_table)
        seq.block_table = []
        self._unreserve(seq)

    def _prefix_ready(self, group: _Group) -> None:
        prefix = group.prefix
        assert prefix is not None
        prefix.status = SequenceStatus.FINISHED
        self.pool.pin(prefix.block_table)
        self.resident[group.group_id] = group
        for m in group.admitted:
            self._start(m)
        group.admitted.clear()

    def _idle_resident_group(self, exclude: int | None) -> _Group | None:
        """The lowest-priority resident prefix with no running member (only its waiting members need it)."""
        idle = [g for g in self.resident.values() if g.num_running == 0 and g.group_id != exclude]
        return max(idle, key=lambda g: g.group_id, default=None)

    def _evict_prefix(self, group: _Group) -> None:
        """Last resort: drop an idle pinned prefix; its group is admitted (and the prefix computed) again."""
        assert group.is_queued and group.waiting
        self.stats.num_prefix_evictions += 1
        prefix = self._drop_prefix(group)
        prefix.num_computed_tokens = 0
        prefix.status = SequenceStatus.WAITING

    def _drop_prefix(self, group: _Group) -> Sequence:
        prefix = group.prefix
        assert prefix is not None
        del self.resident[group.group_id]
        self.pool.unpin(prefix.block_table)
        self._release(prefix)
        return prefix

    def _finish(self, seq: Sequence) -> None:
        group = self._group_of(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        group.num_running -= 1
        group.num_unfinished -= 1
        self.num_unfinished -= 1
        if group.num_unfinished == 0:
            if group.prefix is not None:
                self._drop_prefix(group)
            del self.groups[group.group_id]

    def _reject(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.REJECTED
        self.rejected.append(seq)
        self.rejection_reasons[seq.seq_id] = reason
