"""Steady decode: a run of decode steps over the same sequences, its host state kept as arrays.

Once a pipelined decode step (pipeline.py) decoded every running sequence and admission waits
(``Scheduler.steady``), each next step decodes the same sequences one position further until one of
them ends (or, with ended ones riding as padding, until the step would shrink: below). Rebuilding such
a step from the Sequence objects (schedule, layout, hold, settle, bookkeeping) costs the host ~3.5 ms
per 1,600 sequences; here a step is a few array updates of the previous step's layout, and the sampled
ids wait in arrays. The objects are brought up to date
once, when the run hands back to the engine's own loop (``Handover``), in the state that loop would
have left them in:

- before a step that would end a sequence by length (known in advance), or when the pool lacks a
  block: after the last step's bookkeeping (``Handover.step`` is None), so the engine schedules next;
- when a token read back ends a sequence (an EOS or stop id) and it may not ride: after the next step
  was launched, before its bookkeeping (``Handover.step``), so the engine settles and holds it as its
  own and the stop rule alone decides who ends.

A sequence that ends inside a run rides on as a padding row (one key, written to the scratch block,
its outputs dropped) when its step runs as the loop's would without it: nothing waits for admission
(the loop would admit into the KV the row frees), the same CUDA graph (padded size, group slots, table
width; the row costs nothing there: the graph pads to that size anyway) and the same two-level choice
for its group. A run that starts right after a step that ended sequences starts only where the groups
going on keep that step's two-level choices. Its tokens and its finish are booked when the run hands back
(``finished``).

Requests with stop strings never run steady (a stop string needs the text of every token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from batchllm.engine.attention import BatchLayout, to_device
from batchllm.engine.attention.cost import two_level_pays
from batchllm.engine.heads import RowSampling, StopRule
from batchllm.engine.outputs import EngineStats
from batchllm.engine.pipeline import Pending, ReadBack, settle
from batchllm.engine.requests import Request
from batchllm.engine.runner import ModelRunner, build_layout
from batchllm.engine.scheduler import ScheduleBatch, Scheduler
from batchllm.engine.sequence import PENDING, ScheduledChunk, SequenceStatus
from batchllm.engine.sequence import Sequence as Seq


@dataclass
class Handover:
    """Where a steady run left off: the engine's loop goes on from here."""

    pending: Pending  # the newest step whose ids are not read into the sequences yet
    step: ScheduleBatch | None = None  # launched, not yet held nor booked (its ids: ``ids``)
    seqs: list[Seq] | None = None
    ids: torch.Tensor | None = None
    t_host: float = 0.0  # when the host began ``step`` (its layout)
    t_run: float = 0.0  # when ``step`` was launched
    finished: list[Seq] = field(default_factory=list)  # ended inside the run, finished at the hand-back


def stop_ids(reqs: list[Request], eos: frozenset[int]) -> np.ndarray:
    """Every token id that may end one of the requests (EOS unless ignored, stop token ids)."""
    ids: set[int] = set()
    for r in reqs:
        ids.update(r.params.stop_token_ids)
        if not r.params.ignore_eos:
            ids.update(eos)
    return np.array(sorted(ids), dtype=np.int64)


class SteadyDecode:
    """One run of steady decode steps after ``batch`` (the engine's last step, still ``pending``)."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        batch: ScheduleBatch,
        tokens: torch.Tensor,
        by_seq: dict[int, Request],
        stop: StopRule,
        readback: ReadBack,
    ) -> None:
        self.scheduler, self.runner, self.tokens, self.readback = scheduler, runner, tokens, readback
        self.by_seq, self.stop = by_seq, stop
        # the engine's last step may have ended some of its sequences (by length, or after an EOS): the
        # run goes on with the others, the rows ``entry`` of that step's ids
        going_on = [c.seq.status is SequenceStatus.RUNNING for c in batch.chunks]
        self.entry = None if all(going_on) else np.flatnonzero(going_on)
        self.chunks = [c for c, on in zip(batch.chunks, going_on, strict=True) if on]
        self.seqs = [c.seq for c in self.chunks]
        n = len(self.seqs)
        self.reqs = [by_seq[s.seq_id] for s in self.seqs]
        self.stop_ids = stop_ids(self.reqs, stop.eos_token_ids)
        lengths = np.fromiter((len(s.token_ids) for s in self.seqs), np.int64, n)  # the last is pending
        prompts = np.fromiter((s.num_prompt_tokens for s in self.seqs), np.int64, n)
        budgets = np.fromiter((s.max_tokens for s in self.seqs), np.int64, n)
        # the j-th next step ends a sequence by length when lengths + j reaches either limit
        first_end = np.minimum(prompts + budgets, stop.max_model_len) - lengths
        self.max_steps = int(first_end.min()) - 1  # steps this run may take; the engine runs the next
        self.pos = lengths - 1  # each row's input position at the next step (its KV is computed there)
        self.sampling = RowSampling.of(self.seqs, runner.device)
        self._live_sampling: tuple[int, RowSampling] | None = None  # the live rows' (count, sampling)
        self.seq_ids = to_device(np.fromiter((s.seq_id for s in self.seqs), np.int64, n), runner.device)
        # ids read back, a column per step from the engine's last one (copies: the read-back buffers
        # are taken again in turns)
        self.gen = np.empty((n, max(self.max_steps, 0) + 1), dtype=np.int64)
        self.num_read = 0
        self.layout: BatchLayout
        # rows that ended inside the run (riding as padding) and how many of their read ids are theirs
        self.dead = np.zeros(n, dtype=bool)
        self.num_own = np.zeros(n, dtype=np.int64)
        self.num_tokens = 0  # KV positions computed for live rows over the run (the scheduler's count)
        # each row's group (-1: none) for the two-level choice the loop would make without the dead rows
        shared = [s.num_shared_tokens for s in self.seqs]
        self.group = np.array([s.group_id if k else -1 for s, k in zip(self.seqs, shared, strict=True)])
        self.prefix = {g: k for g, k in zip(self.group.tolist(), shared, strict=True) if g >= 0}
        self.two_level = {c.seq.group_id: c.two_level for c in self.chunks if c.seq.num_shared_tokens}
        # the engine's last step chose two-level attention per group counting the rows that ended with
        # it; where the rows going on would choose otherwise, the engine schedules the next step itself
        if not self._choices_hold(np.ones(n, dtype=bool), set(self.prefix)):
            self.max_steps = 0

    def run(self, pending: Pending, stats: EngineStats, clock: Callable[[], float]) -> Handover:
        """Steps until one of the conditions of the module docstring; each step's time goes to stats."""
        prev_ids, prev_copied = pending.ids, pending.copied
        steps, t_host = 0, clock()
        while steps < self.max_steps:
            layout = self._layout(first=steps == 0)
            if layout is None:
                break
            t_run = clock()
            ids = self._launch(layout)
            t_wait = clock()
            if prev_copied is not None:
                prev_copied.synchronize()
            waited = clock() - t_wait
            read = prev_ids.numpy() if steps or self.entry is None else self._enter(pending)
            ending = self._ending(read)
            if ending.size and not self._rides(ending):
                return self._hand_back_launched(pending, steps, prev_ids, ids, (t_host, t_run))
            self.gen[:, self.num_read] = read
            self.num_read += 1
            self.num_tokens += len(self.seqs) - int(self.dead.sum())
            self.dead[ending], self.num_own[ending] = True, self.num_read  # from the next layout on
            prev_ids, prev_copied = self.readback.later(ids)
            t_out = clock()
            steps += 1
            stats.add_step(len(self.seqs), len(self.seqs), t_out - t_run, t_run - t_host)
            stats.steady_steps += 1
            stats.steady_host_s += t_out - t_host - waited
            t_host = t_out
        if steps == 0:
            return Handover(pending)
        finished = self._catch_up(computed=self.pos + 1, steps=steps)
        return Handover(Pending(self.seqs, prev_ids, prev_copied, self._dead_ids(), set()), finished=finished)

    def _enter(self, pending: Pending) -> np.ndarray:
        """The first read when the engine's last step ended some of its sequences: theirs are settled as
        the engine would (their last id, the finish reason), the others' returned."""
        read = pending.ids.numpy()
        ended = np.setdiff1d(np.arange(len(pending.seqs)), self.entry)
        ids = torch.from_numpy(read[ended])
        others = Pending([pending.seqs[i] for i in ended.tolist()], ids, None, pending.skip, pending.ended)
        assert not settle(others, self.by_seq, self.stop), "sequences that ended with a step end with it"
        return read[self.entry]

    def _ending(self, read: np.ndarray) -> np.ndarray:
        """Live rows whose read id ends them (an EOS unless ignored, or one of their stop ids)."""
        if not self.stop_ids.size:
            return np.zeros(0, dtype=np.int64)
        maybe = np.flatnonzero(np.isin(read, self.stop_ids) & ~self.dead).tolist()
        ends = [i for i in maybe if self.stop.token_ends(self.reqs[i], int(read[i]))]
        return np.array(ends, dtype=np.int64)

    def _rides(self, ending: np.ndarray) -> bool:
        """May the rows that end stay in the run as padding? Where the loop would run the same step without
        them: nothing waits for admission (the loop would admit into the KV they free at its next step;
        a riding row keeps its blocks until the run hands back), a CUDA graph of the same key (padded
        size, group slots, table width), and every group keeps its two-level choice."""
        if not self.scheduler.admission.idle:
            return False
        live = ~self.dead
        live[ending] = False
        graphs, n = self.runner.graphs, int(live.sum())
        if graphs is None or n == 0:  # without graphs a step computes only its live rows
            return False
        if not self._choices_hold(live, set(self.group[ending].tolist()) - {-1}):
            return False
        # the next step's KV lengths: live rows one position further, dead ones frozen at one key
        kv = np.where(live, self.pos + 2, self.layout.start_pos + 1)
        groups = len({g for g in self.group[live].tolist() if g >= 0 and self.two_level[g]})
        riding = graphs.key(len(self.seqs), self.layout.num_groups, int(kv.max()))
        return riding is not None and riding == graphs.key(n, groups, int(kv[live].max()))

    def _choices_hold(self, live: np.ndarray, groups: set[int]) -> bool:
        """Would each of ``groups`` keep its two-level choice with only its ``live`` rows in the step?"""
        for g in groups:
            members = int((live & (self.group == g)).sum())
            if members and two_level_pays(members, self.prefix[g]) != self.two_level[g]:
                return False
        return True

    def _dead_ids(self) -> set[int]:
        return {self.seqs[i].seq_id for i in np.flatnonzero(self.dead).tolist()}

    def _layout(self, first: bool) -> BatchLayout | None:
        """The next step's layout: the engine's last step one position further; None without blocks."""
        bs, live = self.runner.block_size, ~self.dead
        if not first:
            self.pos += live  # a dead row keeps its position (and its blocks)
        starts = np.flatnonzero((self.pos % bs == 0) & live)  # rows whose position opens a new block
        if starts.size and (blocks := self.scheduler.grow([self.seqs[i] for i in starts])) is None:
            if not first:
                self.pos -= live
            return None
        if first:
            self.layout = build_layout(self._chunks(), bs)
            return self.layout
        tables = self.layout.block_tables
        cols = self.pos // bs
        if starts.size:
            if int(cols.max()) >= tables.shape[1]:
                tables = np.pad(tables, ((0, 0), (0, 16)), constant_values=-1)
            tables[starts, cols[starts]] = blocks
        slots = tables[np.arange(len(self.seqs)), cols].astype(np.int64) * bs + self.pos % bs
        kv_lens = (self.pos + 1).astype(np.int32)
        if not live.all():  # dead rows pad: write to the scratch block, read one key of their own
            slots[~live] = self.runner.attention.scratch_block * bs
            kv_lens[~live] = self.layout.start_pos[~live] + 1
        self.layout = replace(
            self.layout, positions=self.pos.copy(), slot_mapping=slots, kv_lens=kv_lens, block_tables=tables
        )
        return self.layout

    def _launch(self, layout: BatchLayout) -> torch.Tensor:
        """Launch one step; its sampled ids stay on the device (and in the engine's token buffer).

        With rows riding, the logits are of the live rows only, as in the loop's step: the logits
        GEMM's kernel depends on its row count, and with it the last bits of a near tie. A riding row
        keeps its last id as its next input."""
        inputs = self.tokens[self.seq_ids]
        hidden = self.runner.run(layout, inputs)
        if not self.dead.any():
            ids = self.sampling.pick(self.runner.model.compute_logits(hidden), self.pos + 1)
        else:
            live = np.flatnonzero(~self.dead)
            if self._live_sampling is None or self._live_sampling[0] != live.size:
                self._live_sampling = (live.size, self.sampling.take(live))
            rows = to_device(live, hidden.device)
            logits = self.runner.model.compute_logits(hidden[rows])
            ids = inputs.clone()
            ids[rows] = self._live_sampling[1].pick(logits, self.pos[live] + 1)
        self.tokens[self.seq_ids] = ids
        return ids

    def _hand_back_launched(
        self,
        pending: Pending,
        steps: int,
        prev_ids: torch.Tensor,
        ids: torch.Tensor,
        times: tuple[float, float],
    ) -> Handover:
        """A read token may end a sequence: hand over the step just launched (its live rows), its previous
        one unsettled."""
        finished: list[Seq] = []
        if steps:
            finished = self._catch_up(computed=self.pos, steps=steps)
            pending = Pending(self.seqs, prev_ids, None, self._dead_ids(), set())
        live, chunks = np.flatnonzero(~self.dead), self._chunks()
        chunks = [chunks[i] for i in live.tolist()]
        if len(live) < len(self.seqs):
            ids = ids[to_device(live, ids.device)]
        seqs = [c.seq for c in chunks]
        return Handover(pending, ScheduleBatch(chunks, len(chunks)), seqs, ids, *times, finished=finished)

    def _chunks(self) -> list[ScheduledChunk]:
        """The next step as the engine's loop would schedule it: one decode chunk per row at ``pos``."""
        return [
            ScheduledChunk(c.seq, p, 1, True, c.two_level)
            for c, p in zip(self.chunks, self.pos.tolist(), strict=True)
        ]

    def _catch_up(self, computed: np.ndarray, steps: int) -> list[Seq]:
        """Bring the sequences up to date: the ids read so far in place of the engine's pending one, then
        a pending id for the newest step; KV computed up to ``computed``. Rows that ended inside the run
        take their own ids only, computed up to their last step, and are finished: returned."""
        rows = self.gen[:, : self.num_read].tolist()
        for seq, row, dead, own in zip(self.seqs, rows, self.dead, self.num_own.tolist(), strict=True):
            t = seq.token_ids
            assert isinstance(t, list) and t[-1] == PENDING
            t[-1] = row[0]
            t.extend(row[1:own] if dead else row[1:])
            if not dead:
                t.append(PENDING)
        computed = np.where(self.dead, self.pos + 1, computed)
        self.scheduler.catch_up(self.seqs, computed.tolist(), steps, self.num_tokens)
        dead = np.flatnonzero(self.dead).tolist()
        for i in dead:  # the stop rule sets their finish reason: their last own id ends them
            assert self.stop(self.reqs[i], self.seqs[i]), "a dead row's last id ends it"
        return self.scheduler.finish(self.seqs[i] for i in dead)
