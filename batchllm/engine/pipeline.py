"""Pipelined decode: a step's sampled tokens are read back after the next step is launched.

While step n+1 is scheduled and launched, step n's ids stay on the device
(the runner feeds them to step n+1 from the engine's token buffer). Each of
step n's sampled sequences holds a PENDING id meanwhile (``hold``); what ends
whatever the token is (max_tokens, the context end) ends with step n. After
step n+1 is launched, ``settle`` reads step n's ids back (waiting for that
step only: ``hold`` queued their copy to pinned memory behind step n, so the
read never waits for step n+1), puts them in place and applies the stop rule: a sequence that
ends with its token (EOS, a stop token or string) has run step n+1 too, whose
token is dropped and which ends it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from batchllm.engine.heads import StopRule
from batchllm.engine.requests import Request
from batchllm.engine.sequence import PENDING
from batchllm.engine.sequence import Sequence as Seq


@dataclass
class Pending:
    """A launched step whose sampled tokens are not read back yet (its sequences hold PENDING)."""

    seqs: list[Seq]  # the step's sampled sequences, rows of ids
    ids: torch.Tensor  # [rows] int64 on the host (pinned), filled when `copied` has happened
    copied: torch.cuda.Event | None  # the copy's event on CUDA; None: ids are ready
    skip: set[int]  # rows whose token is dropped: their sequence had already ended
    ended: set[int]  # ended by length at this step (the stop rule sets their finish reason at settle)


def hold(
    seqs: list[Seq],
    ids: Any,
    late: set[int],
    by_seq: dict[int, Request],
    stop: StopRule,
    now: float,
    readback: ReadBack,
) -> tuple[list[int], Pending | None]:
    """A pipelined step's sampled sequences take a PENDING token each; returns the ids that end with
    this step (by length, or ended by the previous step's token: ``late``) and the step to settle next."""
    ends: list[int] = []
    skip: set[int] = set()
    ended: set[int] = set()
    for seq in seqs:
        sid, req = seq.seq_id, by_seq[seq.seq_id]
        if sid in late:  # this step's token comes after the sequence's end: dropped
            ends.append(sid)
            skip.add(sid)
            continue
        seq.add_tokens((PENDING,))
        if not req.first_token_s:
            req.first_token_s = now
        if stop.by_length(seq):
            ends.append(sid)
            ended.add(sid)
    return ends, (Pending(seqs, *readback.later(ids), skip, ended) if seqs else None)


class ReadBack:
    """Queues the copy of a step's ids to pinned host memory behind that step (``later``). Reading the
    device tensor later (``.tolist()``) would queue the copy then, behind every step launched since, and
    wait for them all: the next step's GPU time would no longer overlap the host's work.

    The pinned buffers are allocated once per run and taken in turns: a buffer is written again three
    steps after it was, when the step that read it (one step later) is long done. A fresh pinned
    buffer per step goes through the pinned allocator, whose misses wait on the driver.
    """

    TURNS = 3

    def __init__(self, rows: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        turns = self.TURNS if self.cuda else 0
        self.buffers = [torch.empty(rows, dtype=torch.int64, pin_memory=True) for _ in range(turns)]
        self.events = [torch.cuda.Event() for _ in range(turns)]
        self.turn = 0

    def later(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The host tensor the ids [rows] will be in, and the event after which they are."""
        if not self.cuda:
            return ids, None
        host, copied = self.buffers[self.turn][: ids.shape[0]], self.events[self.turn]
        host.copy_(ids, non_blocking=True)
        copied.record(torch.cuda.current_stream(ids.device))
        self.turn = (self.turn + 1) % self.TURNS
        return host, copied


def settle(pending: Pending, by_seq: dict[int, Request], stop: StopRule) -> set[int]:
    """Read back a pipelined step's tokens (waits for that step only), put them in place of their
    placeholders and apply the stop rule: the ids of the sequences that end with them but went on."""
    late: set[int] = set()
    if pending.copied is not None:
        pending.copied.synchronize()
    for seq, token in zip(pending.seqs, pending.ids.tolist(), strict=True):
        sid = seq.seq_id
        if sid in pending.skip:
            continue
        seq.token_ids[-1] = token
        req = by_seq[sid]
        if stop.by_token(req, seq):
            if sid not in pending.ended:
                late.add(sid)
        elif sid in pending.ended:
            req.finish_reason = "length"
    return late
