"""Group admission (BatchLLM): which groups and members may start, bounded by KV reservations.

Torch-free bookkeeping the scheduler consults; it never touches blocks or
builds steps. Policy:

- Groups are admitted in plan order and admission never skips ahead: the
  first group in ``fresh`` (or the lowest group id among groups with
  preempted members in ``pending``) blocks everything behind it.
- A group is admitted whole (its prefix and all waiting members reserve their
  estimated KV blocks) when the estimate fits the capacity; a group that can
  never fit whole (or that nothing running could make room for) is admitted
  prefix first, then member by member as reservations free up.
- A member's estimate is its prompt suffix plus max_tokens scaled by
  ``decode_fraction``; with 1.0 it is an upper bound, so the scheduler never
  has to preempt and each prefix is computed once.
- A request that can never fit the pool (or max_model_len) is rejected when
  its group is added, so it can never stall the queue.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as SequenceLike

import numpy as np

from batchllm.engine.kv import BlockPool
from batchllm.engine.sequence import Sequence, SequenceStatus


def shared_prefix_len(prefix_len: int, prompt_lens: Iterable[int], block_size: int) -> int:
    """Tokens a group's members share: whole blocks only, and each member keeps one token of its own.

    The one rule for cutting a group prefix: the scheduler applies it when a
    group is added and request preparation uses it to count planned tokens.
    """
    return min([prefix_len, *(n - 1 for n in prompt_lens)]) // block_size * block_size


def enroll(member: Sequence, group_id: int, prefix_ids: np.ndarray) -> None:
    """Make a waiting sequence a member of group_id, sharing the group's (block-cut) prefix_ids."""
    assert not member.is_prefix and member.status is SequenceStatus.WAITING and not member.block_table
    num_shared = len(prefix_ids)
    assert np.array_equal(member.token_ids[:num_shared], prefix_ids), "member does not start with the prefix"
    member.group_id, member.num_shared_tokens = group_id, num_shared


class Group:
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

    def __init__(self, group_id: int, prefix: Sequence | None, num_members: int) -> None:
        self.group_id = group_id
        self.prefix = prefix
        self.waiting: deque[Sequence] = deque()  # not admitted (or preempted), in priority order
        self.waiting_blocks = 0  # sum of the waiting members' estimates
        self.admitted: list[Sequence] = []  # admitted, waiting for the prefix KV
        self.num_running = 0  # written by the scheduler (members holding blocks)
        self.num_unfinished = num_members
        self.is_queued = False

    def __lt__(self, other: Group) -> bool:
        return self.group_id < other.group_id


class Admission:
    """Queues of groups in plan order and the KV blocks reserved by admitted sequences."""

    def __init__(
        self, pool: BlockPool, max_model_len: int, *, watermark: float = 0.01, decode_fraction: float = 1.0
    ) -> None:
        assert max_model_len > 0 and 0.0 <= watermark < 1.0 and 0.0 < decode_fraction <= 1.0
        self.pool = pool
        self.block_size = pool.block_size
        self.max_model_len = max_model_len
        self.decode_fraction = decode_fraction
        self.capacity = pool.num_blocks - int(watermark * pool.num_blocks)  # admission safety margin
        self.fresh: deque[Group] = deque()  # never touched by admission, plan order
        self.pending: list[Group] = []  # heap by group_id: groups with waiting members
        self.groups: dict[int, Group] = {}  # unfinished groups
        self.reserved: dict[int, int] = {}  # seq_id -> estimated blocks reserved at admission
        self.num_reserved = 0
        self.num_active = 0  # admitted unfinished members (running or waiting for their prefix)
        self.rejected: list[Sequence] = []
        self.rejection_reasons: dict[int, str] = {}  # seq_id -> why it can never run
        self._next_group_id = 0

    # ---- groups -------------------------------------------------------------------

    def add_group(
        self, prefix_token_ids: SequenceLike[int], members: list[Sequence]
    ) -> tuple[int, list[Sequence]]:
        """Queue a group after all earlier ones; returns its group_id and the members accepted.

        Sets each member's group_id and num_shared_tokens (``shared_prefix_len``).
        Members that can never fit are rejected and never run.
        """
        gid = self._next_group_id
        self._next_group_id += 1
        num_shared = shared_prefix_len(
            len(prefix_token_ids), (m.num_prompt_tokens for m in members), self.block_size
        )
        prefix_ids = np.asarray(prefix_token_ids[:num_shared], dtype=np.int64)
        accepted: list[Sequence] = []
        for m in members:
            enroll(m, gid, prefix_ids)
            need = self.pool.blocks_for(self.kv_tokens(m, 1.0))
            if m.num_prompt_tokens > self.max_model_len:
                self._reject(
                    m, f"prompt has {m.num_prompt_tokens} tokens, max_model_len is {self.max_model_len}"
                )
            elif need > self.pool.num_blocks:
                self._reject(m, f"needs {need} KV blocks, the pool has {self.pool.num_blocks}")
            else:
                accepted.append(m)
        if not accepted:
            return gid, accepted
        prefix = None
        if num_shared:
            prefix = Sequence(-1 - gid, None, prefix_ids, num_shared, 0, group_id=gid, is_prefix=True)
        group = Group(gid, prefix, len(accepted))
        for m in accepted:
            self._push_waiting(group, m, front=False)
        self.groups[gid] = group
        self.fresh.append(group)
        return gid, accepted

    def group_of(self, seq: Sequence) -> Group:
        assert seq.group_id is not None
        return self.groups[seq.group_id]

    @property
    def idle(self) -> bool:
        """No group waits for admission (every member was admitted)."""
        return not self.pending and not self.fresh

    def head(self) -> Group | None:
        """The group admission must serve next (None when nothing waits)."""
        if not self.pending:
            if not self.fresh:
                return None
            self.queue(self.fresh.popleft())
        return self.pending[0]

    def pop_head(self) -> None:
        """The head group has no waiting member left."""
        heapq.heappop(self.pending).is_queued = False

    def queue(self, group: Group) -> None:
        if not group.is_queued:
            group.is_queued = True
            heapq.heappush(self.pending, group)

    def remove(self, group: Group) -> None:
        """The group's last member finished."""
        del self.groups[group.group_id]

    # ---- admission decisions --------------------------------------------------------

    def admit_prefix(self, group: Group) -> bool:
        """Reserve a waiting group's prefix, with all its members when they fit; False: not now."""
        prefix = group.prefix
        assert prefix is not None and prefix.status is SequenceStatus.WAITING and group.waiting
        prefix_blocks = self.estimate(prefix)
        whole = prefix_blocks + group.waiting_blocks
        first = prefix_blocks + self.estimate(group.waiting[0])
        if self.fits(whole):
            for m in group.waiting:
                self.reserve(m)
            group.admitted.extend(group.waiting)
            group.waiting.clear()
            group.waiting_blocks = 0
        elif not ((whole > self.capacity or self.num_active == 0) and self.fits(first, force=True)):
            return False
        # else: too large to fit whole (or nothing else can free memory): prefix, then members one by one
        self.reserve(prefix)
        return True

    def take_member(self, group: Group) -> Sequence | None:
        """Reserve and return the group's next waiting member, or None when it does not fit now."""
        m = group.waiting[0]
        est = self.estimate(m)
        if not self.fits(est, force=True):
            return None
        group.waiting.popleft()
        group.waiting_blocks -= est
        self.reserve(m)
        return m

    def requeue(self, seq: Sequence) -> None:
        """seq was preempted (its KV dropped): its members wait again, at the front of their group."""
        group = self.group_of(seq)
        if seq.is_prefix:
            for m in reversed(group.admitted):
                self.unreserve(m)
                self._push_waiting(group, m, front=True)
            group.admitted.clear()
        else:
            self._push_waiting(group, seq, front=True)
        self.queue(group)

    def fits(self, num_blocks: int, force: bool = False) -> bool:
        # force: with no member active nothing would ever free reservations, so admit one anyway
        return self.num_reserved + num_blocks <= self.capacity or (force and self.num_active == 0)

    def estimate(self, seq: Sequence) -> int:
        """Blocks seq is expected to add beyond its group's shared prefix."""
        if seq.is_prefix:
            return seq.num_tokens // self.block_size
        num_kv = self.kv_tokens(seq, self.decode_fraction)
        return self.pool.blocks_for(num_kv) - seq.num_shared_tokens // self.block_size

    def kv_tokens(self, seq: Sequence, decode_fraction: float) -> int:
        """KV positions of seq once it has generated decode_fraction x max_tokens (the last token needs none)."""
        decode = math.ceil(decode_fraction * seq.max_tokens)
        return min(max(seq.num_prompt_tokens + decode - 1, seq.num_tokens), self.max_model_len)

    def reserve(self, seq: Sequence) -> None:
        est = self.estimate(seq)
        self.reserved[seq.seq_id] = est
        self.num_reserved += est
        if not seq.is_prefix:
            self.num_active += 1

    def unreserve(self, seq: Sequence) -> None:
        self.num_reserved -= self.reserved.pop(seq.seq_id)
        if not seq.is_prefix:
            self.num_active -= 1

    def check_integrity(self) -> None:
        assert self.num_reserved == sum(self.reserved.values())

    def _push_waiting(self, group: Group, seq: Sequence, front: bool) -> None:
        if front:
            group.waiting.appendleft(seq)
        else:
            group.waiting.append(seq)
        group.waiting_blocks += self.estimate(seq)

    def _reject(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.REJECTED
        self.rejected.append(seq)
        self.rejection_reasons[seq.seq_id] = reason
