"""BatchLLM step assembly: memory-centric token batching with chunked prefill, and
preemption by recompute. Device independent (no torch); the engine drives it:

    scheduler.add_group(prefix_token_ids, members)       # groups in plan order
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        ... forward batch.chunks; run the head on each `sample` chunk ...
        done = scheduler.on_step_done(batch, finished_seq_ids)

Admission (admission.py) decides which groups and members may start; this module
turns running sequences into steps (``steady`` repeats a decode step). Policy:
- A prefix is prefilled once (no output); when its KV is complete its blocks
  are pinned and its admitted members start from position num_shared_tokens,
  sharing those blocks. The pin is dropped after the group's last member.
- Each step takes every running decode first, then prefill chunks of running
  sequences in admission order, then newly admitted work, up to
  ``max_num_batched_tokens``. The batch lists plain chunks first, then the
  chunks of each group contiguously (ascending group id), the layout two-level
  attention reads a group's prefix in.
- The engine alone decides that a sequence ends (``finished_seq_ids``).
- When blocks run out (only with ``decode_fraction`` < 1), the newest running
  sequence is preempted and later recomputed from its group's prefix. The
  oldest running sequence is never preempted: once alone it may evict idle
  pinned prefixes (groups with no running member), so it always progresses.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass, field

from batchllm.engine.admission import Admission, Group
from batchllm.engine.kv import BlockPool
from batchllm.engine.outputs import SchedulerStats
from batchllm.engine.sequence import ScheduledChunk, Sequence, SequenceStatus, grouped_chunks

__all__ = ["ScheduleBatch", "ScheduledChunk", "Scheduler"]


@dataclass
class ScheduleBatch:
    """One step: plain chunks, then each group's chunks contiguously. Blocks for every chunk are allocated."""

    chunks: list[ScheduledChunk]
    num_tokens: int


@dataclass
class _Step:
    budget: int
    chunks: dict[int, ScheduledChunk] = field(default_factory=dict)  # seq_id -> chunk, in scheduling order


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
        self.pool = BlockPool(num_blocks, block_size)
        self.admission = Admission(
            self.pool, max_model_len, watermark=watermark, decode_fraction=decode_fraction
        )
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.running: list[Sequence] = []  # holding blocks, in admission order (= priority)
        self.resident: dict[int, Group] = {}  # groups whose prefix KV is complete and pinned
        self.num_unfinished = 0
        self.stats = SchedulerStats()

    @property
    def rejected(self) -> list[Sequence]:
        """Requests that can never run (too long for max_model_len, or larger than the pool)."""
        return self.admission.rejected

    @property
    def rejection_reasons(self) -> dict[int, str]:
        return self.admission.rejection_reasons

    # ---- engine API ---------------------------------------------------------------

    def add_group(self, prefix_token_ids: SequenceLike[int], members: list[Sequence]) -> int:
        """Queue a group after all earlier ones; returns its group_id (see ``Admission.add_group``)."""
        gid, accepted = self.admission.add_group(prefix_token_ids, members)
        self.num_unfinished += len(accepted)
        self.stats.num_prompt_tokens_logical += sum(m.num_prompt_tokens for m in accepted)
        return gid

    def has_unfinished(self) -> bool:
        return self.num_unfinished > 0

    def schedule(self) -> ScheduleBatch:
        """Running decodes, then running prefill chunks, then new admissions, within the token budget."""
        step = _Step(self.max_num_batched_tokens)
        running = self.running
        self._schedule_decodes(step)
        i = 0
        while i < len(running) and step.budget > 0:  # prefill
            seq = running[i]
            if seq.seq_id not in step.chunks and not self._schedule_prefill(seq, step):
                break
            i += 1
        self._admit(step)
        batch = ScheduleBatch(grouped_chunks(step.chunks.values()), self.max_num_batched_tokens - step.budget)
        assert batch.chunks or not self.has_unfinished(), "scheduler made no progress"
        self.stats.peak_kv_blocks = self.pool.peak_used
        return batch

    def _schedule_decodes(self, step: _Step) -> None:
        """A chunk for each running sequence with one position to compute (its newest token), oldest
        first. The hot loop of a step (one pass over 1,600 sequences), so ``_add_chunk`` is inlined:
        a decode chunk needs at most one new block."""
        bs, chunks, pool = self.block_size, step.chunks, self.pool
        for seq in self.running:  # _make_room pops only sequences after this one
            if step.budget <= 0:
                break
            n, start, table = len(seq.token_ids), seq.num_computed_tokens, seq.block_table
            if n - start != 1:
                continue
            if len(table) * bs < n:  # its position opens a block
                if not self._make_room(seq, step):
                    break  # seq was the newest running sequence and preempted itself
                table.append(pool.allocate_one())
            chunks[seq.seq_id] = ScheduledChunk(seq, start, 1, not seq.is_prefix)
            step.budget -= 1

    def on_step_done(self, batch: ScheduleBatch, finished_seq_ids: Iterable[int] = ()) -> list[Sequence]:
        """Advance computed lengths and finish the sequences the engine lists; returns them.

        The engine decides every ending (EOS, stop, max_tokens, max_model_len, a head that answers in
        one forward). It must have appended at least one token to each ``sample`` chunk's sequence that
        goes on (more when a grammar forces them: their KV is the next chunk), a finishing one maybe none.
        """
        finished_ids = set(finished_seq_ids)
        stats = self.stats
        stats.add_steps(1, batch.num_tokens, batch.num_tokens)
        done: list[Sequence] = []
        changed = False
        for ch in batch.chunks:  # once per sequence of the step: kept lean
            seq, start = ch.seq, ch.start
            end = start + ch.num_tokens
            assert seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == start
            seq.num_computed_tokens = end
            if start < seq.num_prompt_tokens:
                stats.num_prompt_tokens_computed += min(end, seq.num_prompt_tokens) - start
            if seq.is_prefix:
                group = self.admission.group_of(seq)
                if start == 0:
                    counts = stats.prefix_computations
                    counts[group.group_id] = counts.get(group.group_id, 0) + 1
                if seq.num_computed_tokens == seq.num_tokens:
                    self._prefix_ready(group)
                    changed = True
            elif ch.sample:
                if seq.seq_id in finished_ids:
                    assert seq.num_tokens >= end, "a finished sequence keeps its tokens"
                    finished_ids.discard(seq.seq_id)
                    self._finish(seq)
                    done.append(seq)
                    changed = True
                else:
                    # one sampled token, then any tokens a grammar forces (jump-forward); the engine must
                    # end a sequence at max_model_len
                    assert end < len(seq.token_ids) < self.max_model_len, "a token per sampled chunk"
        assert not finished_ids, f"finished ids that were not sampled this step: {sorted(finished_ids)}"
        if changed:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        return done

    def finish(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        """Finish running sequences outside a step (the engine learned late that they ended)."""
        done = list(seqs)
        for seq in done:
            assert seq.status is SequenceStatus.RUNNING and not seq.is_prefix
            self._finish(seq)
        if done:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        return done

    def steady(self, batch: ScheduleBatch, ended: bool) -> bool:
        """Would each next step decode just the sequences batch decoded and that go on, until one ends?
        Yes when batch decoded every running sequence and admission waits: for want of KV, not of budget,
        when none of batch's sequences ended (``ended``: their KV is free now); else for nothing at all."""
        nothing_to_admit = self.admission.idle or (
            not ended and batch.num_tokens < self.max_num_batched_tokens
        )
        going_on = sum(c.seq.status is SequenceStatus.RUNNING for c in batch.chunks)
        return (
            0 < going_on == len(self.running)
            and nothing_to_admit
            and all(c.sample and c.is_decode for c in batch.chunks)
        )

    def grow(self, seqs: list[Sequence]) -> list[int] | None:
        """One new block for each of seqs (their next position starts one), or None when too few are free."""
        if len(seqs) > self.pool.num_free:
            return None
        ids = self.pool.allocate(len(seqs))
        for seq, b in zip(seqs, ids, strict=True):
            seq.block_table.append(b)
        self.stats.peak_kv_blocks = self.pool.peak_used
        return ids

    def catch_up(self, seqs: list[Sequence], computed: list[int], steps: int, tokens: int) -> None:
        """Steady decode ran ``steps`` steps of up to one token per sequence (``tokens`` in all); seqs now
        hold KV up to computed."""
        for seq, n in zip(seqs, computed, strict=True):
            seq.num_computed_tokens = n
        self.stats.add_steps(steps, tokens, len(seqs))  # rows that ended inside the run compute none

    def check_integrity(self) -> None:
        """Cross-check block tables against the pool (tests call it after every step)."""
        self.pool.check_integrity()
        self.admission.check_integrity()
        refs = [0] * self.pool.num_blocks
        holders = self.running + [g.prefix for g in self.resident.values() if g.prefix is not None]
        for seq in holders:
            assert seq.num_computed_tokens <= len(seq.block_table) * self.block_size
            for b in seq.block_table:
                refs[b] += 1
            if seq.num_shared_tokens:
                prefix = self.admission.group_of(seq).prefix
                assert prefix is not None and prefix.status is SequenceStatus.FINISHED
                shared = seq.block_table[: seq.num_shared_tokens // self.block_size]
                assert shared == prefix.block_table
                assert all(self.pool.is_pinned(b) for b in shared), "a member's prefix block is not pinned"
        assert refs == self.pool.ref_counts, "block ref counts disagree with block tables"

    # ---- admission ----------------------------------------------------------------

    def _admit(self, step: _Step) -> None:
        """Admit groups in plan order while their estimates fit; stop at the first that does not."""
        while step.budget > 0:
            group = self.admission.head()
            if group is None or not self._admit_group(group, step):
                return
            self.admission.pop_head()

    def _admit_group(self, group: Group, step: _Step) -> bool:
        """Start what admission lets in of group; True when none of its members is left waiting."""
        prefix = group.prefix
        if prefix is not None and prefix.status is SequenceStatus.WAITING:
            if not self.admission.admit_prefix(group):
                return False
            prefix.status = SequenceStatus.RUNNING
            self.running.append(prefix)
            if not self._schedule_prefill(prefix, step):
                return False
        while group.waiting:
            if step.budget == 0:
                return False
            m = self.admission.take_member(group)
            if m is None:
                return False
            if prefix is None or prefix.status is SequenceStatus.FINISHED:
                self._start(m)
                if not self._schedule_prefill(m, step):
                    return False  # no blocks even for its first chunk: wait for running work
            else:
                group.admitted.append(m)
        return True

    # ---- running ------------------------------------------------------------------

    def _start(self, m: Sequence) -> None:
        """Give an admitted member its shared prefix blocks and make it runnable."""
        group = self.admission.group_of(m)
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
        self.stats.num_preemptions += 1
        seq.num_preemptions += 1
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        if not seq.is_prefix:
            self.admission.group_of(seq).num_running -= 1
        self.admission.requeue(seq)

    def _release(self, seq: Sequence) -> None:
        """Drop seq's block references and its reservation."""
        self.pool.release(seq.block_table)
        seq.block_table = []
        self.admission.unreserve(seq)

    def _prefix_ready(self, group: Group) -> None:
        prefix = group.prefix
        assert prefix is not None
        prefix.status = SequenceStatus.FINISHED
        self.pool.pin(prefix.block_table)
        self.resident[group.group_id] = group
        for m in group.admitted:
            self._start(m)
        group.admitted.clear()

    def _idle_resident_group(self, exclude: int | None) -> Group | None:
        """The lowest-priority resident prefix with no running member (only its waiting members need it)."""
        idle = [g for g in self.resident.values() if g.num_running == 0 and g.group_id != exclude]
        return max(idle, key=lambda g: g.group_id, default=None)

    def _evict_prefix(self, group: Group) -> None:
        """Last resort: drop an idle pinned prefix; its group is admitted (and the prefix computed) again."""
        assert group.is_queued and group.waiting
        self.stats.num_prefix_evictions += 1
        prefix = self._drop_prefix(group)
        prefix.num_computed_tokens = 0
        prefix.status = SequenceStatus.WAITING

    def _drop_prefix(self, group: Group) -> Sequence:
        prefix = group.prefix
        assert prefix is not None
        del self.resident[group.group_id]
        self.pool.unpin(prefix.block_table)
        self._release(prefix)
        return prefix

    def _finish(self, seq: Sequence) -> None:
        group = self.admission.group_of(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        group.num_running -= 1
        group.num_unfinished -= 1
        self.num_unfinished -= 1
        if group.num_unfinished == 0:
            if group.prefix is not None:
                self._drop_prefix(group)
            self.admission.remove(group)
