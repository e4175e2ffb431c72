"""Steady decode: a run of decode steps over the same sequences, its host state kept as arrays.

Once a pipelined decode step (pipeline.py) decoded every running sequence, none ended and admission
waits for KV (``Scheduler.steady``), each next step decodes the same sequences one position further
until one of them ends. Rebuilding such a step from the Sequence objects (schedule, layout, hold,
settle, bookkeeping) costs the host ~5 ms per 1,600 sequences; here a step is a few array updates of
the previous step's layout, and the sampled ids wait in arrays. The objects are brought up to date
once, when the run hands back to the engine's own loop (``Handover``), in the state that loop would
have left them in:

- before a step that would end a sequence by length (known in advance), or when the pool lacks a
  block: after the last step's bookkeeping (``Handover.step`` is None), so the engine schedules next;
- when a token read back is an EOS or stop id of any sequence of the run: after the next step was
  launched, before its bookkeeping (``Handover.step``), so the engine settles and holds it as its own
  and the stop rule alone decides who ends.

Requests with stop strings never run steady (a stop string needs the text of every token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from batchllm.engine.attention import BatchLayout, to_device
from batchllm.engine.heads import RowSampling, StopRule
from batchllm.engine.outputs import EngineStats
from batchllm.engine.pipeline import Pending, ReadBack
from batchllm.engine.requests import Request
from batchllm.engine.runner import ModelRunner, build_layout
from batchllm.engine.scheduler import ScheduleBatch, Scheduler
from batchllm.engine.sequence import PENDING, ScheduledChunk
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
        self.chunks = batch.chunks
        self.seqs = [c.seq for c in batch.chunks]
        n = len(self.seqs)
        reqs = [by_seq[s.seq_id] for s in self.seqs]
        self.stop_ids = stop_ids(reqs, stop.eos_token_ids)
        lengths = np.fromiter((len(s.token_ids) for s in self.seqs), np.int64, n)  # the last is pending
        prompts = np.fromiter((s.num_prompt_tokens for s in self.seqs), np.int64, n)
        budgets = np.fromiter((s.max_tokens for s in self.seqs), np.int64, n)
        # the j-th next step ends a sequence by length when lengths + j reaches either limit
        first_end = np.minimum(prompts + budgets, stop.max_model_len) - lengths
        self.max_steps = int(first_end.min()) - 1  # steps this run may take; the engine runs the next
        self.pos = lengths - 1  # each row's input position at the next step (its KV is computed there)
        self.sampling = RowSampling.of(self.seqs, runner.device)
        self.seq_ids = to_device(np.fromiter((s.seq_id for s in self.seqs), np.int64, n), runner.device)
        # ids read back, a column per step from the engine's last one (copies: the read-back buffers
        # are taken again in turns)
        self.gen = np.empty((n, max(self.max_steps, 0) + 1), dtype=np.int64)
        self.num_read = 0
        self.layout: BatchLayout

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
            read = prev_ids.numpy()
            if self.stop_ids.size and np.isin(read, self.stop_ids).any():
                return self._hand_back_launched(pending, steps, prev_ids, ids, (t_host, t_run))
            self.gen[:, self.num_read] = read
            self.num_read += 1
            prev_ids, prev_copied = self.readback.later(ids)
            t_out = clock()
            steps += 1
            stats.add_step(len(self.seqs), len(self.seqs), t_out - t_run, t_run - t_host)
            stats.steady_steps += 1
            stats.steady_host_s += t_out - t_host - waited
            t_host = t_out
        if steps == 0:
            return Handover(pending)
        self._catch_up(computed=self.pos + 1, steps=steps)
        return Handover(Pending(self.seqs, prev_ids, prev_copied, set(), set()))

    def _layout(self, first: bool) -> BatchLayout | None:
        """The next step's layout: the engine's last step one position further; None without blocks."""
        bs = self.runner.block_size
        if not first:
            self.pos += 1
        starts = np.flatnonzero(self.pos % bs == 0)  # rows whose position opens a new block
        if starts.size and (blocks := self.scheduler.grow([self.seqs[i] for i in starts])) is None:
            if not first:
                self.pos -= 1
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
        self.layout = replace(
            self.layout,
            positions=self.pos.copy(),
            slot_mapping=slots,
            kv_lens=(self.pos + 1).astype(np.int32),
            block_tables=tables,
        )
        return self.layout

    def _launch(self, layout: BatchLayout) -> torch.Tensor:
        """Launch one step; its sampled ids stay on the device (and in the engine's token buffer)."""
        hidden = self.runner.run(layout, self.tokens[self.seq_ids])
        ids = self.sampling.pick(self.runner.model.compute_logits(hidden), self.pos + 1)
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
        """A read token may end a sequence: hand over the step just launched, its previous one unsettled."""
        if steps:
            self._catch_up(computed=self.pos, steps=steps)
            pending = Pending(self.seqs, prev_ids, None, set(), set())
        chunks = self._chunks()
        return Handover(pending, ScheduleBatch(chunks, len(chunks)), self.seqs, ids, *times)

    def _chunks(self) -> list[ScheduledChunk]:
        """The next step as the engine's loop would schedule it: one decode chunk per row at ``pos``."""
        return [
            ScheduledChunk(c.seq, p, 1, True, c.two_level)
            for c, p in zip(self.chunks, self.pos.tolist(), strict=True)
        ]

    def _catch_up(self, computed: np.ndarray, steps: int) -> None:
        """Bring the sequences up to date: the ids read so far in place of the engine's pending one, then
        a pending id for the newest step; KV computed up to ``computed``."""
        rows = self.gen[:, : self.num_read].tolist()
        for seq, row in zip(self.seqs, rows, strict=True):
            t = seq.token_ids
            assert isinstance(t, list) and t[-1] == PENDING
            t[-1] = row[0]
            t.extend(row[1:])
            t.append(PENDING)
        self.scheduler.catch_up(self.seqs, computed.tolist(), steps)
