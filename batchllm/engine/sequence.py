"""Sequence and ScheduledChunk: the per-request state shared by engine, scheduler and runner.

One writer per field: the engine creates sequences and appends sampled tokens
to ``token_ids`` (and owns ``params``); the scheduler writes ``group_id``,
``num_shared_tokens`` (in ``add_group``), ``block_table``,
``num_computed_tokens``, ``status`` and ``num_preemptions``. Derived numbers are
properties, never stored twice.

Token positions of a group member:

    [0, num_shared_tokens)                 group prefix KV (pinned, shared blocks)
    [num_shared_tokens, num_prompt_tokens) the member's own prompt suffix
    [num_prompt_tokens, num_tokens)        generated tokens
    [0, num_computed_tokens)               positions whose KV is in block_table
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from batchllm.engine.attention.cost import two_level_pays

PENDING = -1  # a sampled token id still on the device (the engine reads it back one step later)


class SequenceStatus(Enum):
    WAITING = "waiting"  # not admitted, or preempted (recomputed when admitted again)
    RUNNING = "running"  # admitted: holds blocks and gets chunks
    FINISHED = "finished"  # done (for a group prefix: its KV is fully computed)
    REJECTED = "rejected"  # can never fit the KV pool or max_model_len; never scheduled


@dataclass(eq=False)
class Sequence:
    """A request (or a group's shared prefix when ``is_prefix``) as the scheduler sees it."""

    seq_id: int
    request_index: int | None  # None for a group-prefix pseudo-sequence
    # prompt, then generated tokens (``add_tokens``). The prompt stays the int64 array it came as until
    # the first generated token: a job's millions of prompt tokens as Python ints cost ~0.3 s before
    # the first step, and a prefill-only sequence never generates
    token_ids: list[int] | np.ndarray
    num_prompt_tokens: int
    max_tokens: int
    group_id: int | None = None
    num_shared_tokens: int = 0  # leading tokens served by the group's prefix blocks; block aligned
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    is_prefix: bool = False  # prefill only: computes KV, samples no token
    status: SequenceStatus = SequenceStatus.WAITING
    num_preemptions: int = 0
    params: Any = None  # engine-owned sampling parameters; the scheduler never reads them
    # prefill-only tree sequences (packing.Unit): RoPE position and visibility end of each stored token;
    # None for a plain causal sequence (position = storage index)
    rope_positions: Any = None  # np.ndarray [num_tokens] int64
    key_ends: Any = None  # np.ndarray [num_tokens] int32: key k is seen by queries k <= q < key_ends[k]

    def __post_init__(self) -> None:
        assert 0 < self.num_prompt_tokens <= len(self.token_ids), "a sequence needs at least one prompt token"
        assert self.is_prefix or self.max_tokens >= 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def add_tokens(self, tokens: Iterable[int]) -> None:
        """Generated tokens at the end (the prompt becomes a list here, inside the overlapped loop)."""
        if not isinstance(self.token_ids, list):
            self.token_ids = self.token_ids.tolist()
        self.token_ids.extend(tokens)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_remaining(self) -> int:
        """Tokens whose KV is still to compute before the next sample (or, for a prefix, at all)."""
        return len(self.token_ids) - self.num_computed_tokens


@dataclass(slots=True, eq=False)
class ScheduledChunk:
    """Compute KV for positions [start, start + num_tokens) of seq; run the output head when ``sample``.

    The one chunk type of the engine: the scheduler creates it, the runner reads
    it (``runner.Chunk`` names the same fields) and the engine feeds the head.
    """

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool
    # reads its group's prefix through two-level attention (False: a plain chunk over its whole
    # block table, prefix blocks included; ``attention.cost.two_level_pays`` decides per step)
    two_level: bool = True

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def is_decode(self) -> bool:
        """A generated token's KV (one position past the prompt), as opposed to prompt prefill."""
        return not self.seq.is_prefix and self.start >= self.seq.num_prompt_tokens


def grouped_chunks(chunks: Iterable[ScheduledChunk]) -> list[ScheduledChunk]:
    """Plain chunks first (scheduling order), then grouped chunks contiguous by ascending group id.

    A chunk is grouped when it reads a shared prefix (num_shared_tokens > 0)
    and its group's chunks in this step make two-level attention pay
    (``attention.cost``); otherwise it is plain, as a group prefix's own chunks
    are. The sort is stable, so members keep their scheduling order inside a group.
    """
    plain: list[ScheduledChunk] = []
    by_group: dict[int, list[ScheduledChunk]] = {}
    for c in chunks:
        if c.seq.num_shared_tokens:
            by_group.setdefault(c.seq.group_id, []).append(c)  # type: ignore[arg-type]
        else:
            plain.append(c)
    shared: list[ScheduledChunk] = []
    for gid in sorted(by_group):
        members = by_group[gid]
        pays = two_level_pays(len(members), members[0].seq.num_shared_tokens)
        for c in members:
            c.two_level = pays
        (shared if pays else plain).extend(members)
    return plain + shared
