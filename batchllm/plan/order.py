"""Group execution order and sharding across workers.

Order: groups with a larger decode/prompt ratio run first, so their long decode
phases overlap with the prefill chunks of the groups that follow (BatchLLM).
decode = sum of the members' max_tokens, prompt = the group's physical prefill
tokens (prefix once + suffixes). Ties break on the smallest member input index,
so the order is a pure function of the input.

Shards: whole groups per shard, balanced by estimated cost = prefill tokens +
decode tokens, largest first (LPT) onto the least loaded shard; the long tail
of small groups is poured into the remaining capacity (water-filling) in one
vectorized step, which matters when a plan has millions of plain requests.
When a group does not fit in the room left on the least loaded shard (up to an
even share of the total), it is split by members: the run of members that
fills the room stays there and the rest moves on to the next shard. Every
piece recomputes the prefix once, so a piece is only cut off when the prefix
is at most 10% of the room it fills; otherwise the group stays whole.
"""

from __future__ import annotations

import heapq

import numpy as np

from .tree import concat_ranges
from .types import Plan, make_plan

_LPT_ITEMS_PER_SHARD = 64  # the largest groups placed one by one; the rest in one vectorized fill
_SPLIT_PREFILL_BUDGET = 0.1  # a piece of a split group recomputes the prefix: at most 10% of the piece


def group_costs(
    prefix_len: np.ndarray, offsets: np.ndarray, members: np.ndarray, lengths: np.ndarray, decode: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(physical prefill tokens, decode tokens) per group; decode is per input index."""
    sizes = np.diff(offsets)
    gid = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    prefill = np.bincount(gid, weights=lengths[members], minlength=sizes.size) - (sizes - 1) * prefix_len
    dec = np.bincount(gid, weights=decode[members], minlength=sizes.size)
    return prefill, dec


def execution_order(
    prefix_len: np.ndarray, offsets: np.ndarray, members: np.ndarray, lengths: np.ndarray, decode: np.ndarray
) -> np.ndarray:
    """Permutation of groups: decode/prompt ratio descending, then smallest member index."""
    if prefix_len.size == 0:
        return np.zeros(0, dtype=np.int64)
    prefill, dec = group_costs(prefix_len, offsets, members, lengths, decode)
    ratio = dec / np.maximum(prefill, 1.0)
    first = np.minimum.reduceat(members, offsets[:-1])
    return np.lexsort((first, -ratio))


def permute_groups(
    prefix_len: np.ndarray, offsets: np.ndarray, members: np.ndarray, perm: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes = np.diff(offsets)[perm]
    new_offsets = np.zeros(perm.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=new_offsets[1:])
    return prefix_len[perm], new_offsets, members[concat_ranges(offsets[:-1][perm], sizes)]


def shard_plan(plan: Plan, n: int, split: bool = True) -> list[Plan]:
    """Split a plan into n shard plans balanced by estimated cost.

    Each shard is a Plan over global input indices, keeping the parent's group
    order; every input appears in exactly one shard (duplicates go with their
    representative). A split group appears in several shards with the same
    prefix, once per shard. Shards may be empty when there are fewer groups than shards.
    """
    if n < 1:
        raise ValueError("shard_plan: n must be >= 1")
    prefix_len, offsets, members = plan.prefix_len, plan.member_offsets, plan.members
    own = (plan.table.lengths[members] - plan.suffix_start + plan.member_max_tokens).astype(np.float64)
    pieces = pack(prefix_len, offsets, own, n, split)
    out = []
    for s in range(n):
        mine = pieces[pieces[:, 3] == s]
        mine = mine[np.lexsort((mine[:, 1], mine[:, 0]))]  # plan order, then member order
        sizes = mine[:, 2] - mine[:, 1]
        mem = members[concat_ranges(mine[:, 1], sizes)]
        # pieces of one group on one shard are one group there: its prefix is computed once
        first = (
            np.flatnonzero(np.r_[True, mine[1:, 0] != mine[:-1, 0]]) if mine.size else np.zeros(0, np.int64)
        )
        off = np.zeros(first.size + 1, dtype=np.int64)
        if first.size:
            np.cumsum(np.add.reduceat(sizes, first), out=off[1:])
        pl = prefix_len[mine[first, 0]]
        out.append(make_plan(plan.table, plan.max_tokens, plan.duplicate_of, pl, off, mem, plan.block_size))
    return out


def pack(
    prefix_len: np.ndarray, offsets: np.ndarray, own: np.ndarray, n: int, split: bool = True
) -> np.ndarray:
    """Assign groups (or member runs of groups) to n shards.

    own: per member entry, its suffix + decode cost; a group costs its prefix
    plus its members' own costs. Returns rows (group, member lo, member hi,
    shard) with lo/hi indexing the plan's member array.
    """
    groups = prefix_len.size
    cum = np.zeros(own.size + 1)
    np.cumsum(own, out=cum[1:])
    cost = prefix_len + cum[offsets[1:]] - cum[offsets[:-1]]
    if groups == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if n == 1:
        return np.stack([np.arange(groups), offsets[:-1], offsets[1:], np.zeros(groups, np.int64)], axis=1)
    total = float(cost.sum())
    by_cost = np.lexsort((np.arange(groups), -cost))  # largest first, ties in plan order
    head, tail = by_cost[: _LPT_ITEMS_PER_SHARD * n], by_cost[_LPT_ITEMS_PER_SHARD * n :]
    best: tuple[float, list[tuple[int, int, int, int]], list[tuple[float, int]]] | None = None
    share = total / n
    for _ in range(3):  # pieces add prefill; raise the share by what the last pass added, keep the best
        rows, heap = _pack_head(head, offsets, prefix_len, cum, share, n, split)
        loads = [load for load, _ in heap]
        tail_cost = float(cost[tail].sum())
        peak = max(max(loads), (sum(loads) + tail_cost) / n)  # the tail fills up to a common level
        if best is None or peak < best[0]:
            best = (peak, rows, heap)
        extra = sum(loads) + tail_cost - total
        if extra <= 0:
            break
        share = (total + extra) / n
    assert best is not None
    _, rows, heap = best
    out = np.array(rows, dtype=np.int64).reshape(-1, 4)
    if tail.size:
        loads = np.zeros(n)
        for load, s in heap:
            loads[s] = load
        shard = _water_fill(loads, cost[tail])
        extra = np.stack([tail, offsets[tail], offsets[tail + 1], shard], axis=1)
        out = np.concatenate((out, extra))
    return out


def _pack_head(
    head: np.ndarray,
    offsets: np.ndarray,
    prefix_len: np.ndarray,
    cum: np.ndarray,
    share: float,
    n: int,
    split: bool,
) -> tuple[list[tuple[int, int, int, int]], list[tuple[float, int]]]:
    """LPT over the largest groups, cutting a group where it overflows the least loaded shard."""
    rows: list[tuple[int, int, int, int]] = []
    heap = [(0.0, s) for s in range(n)]
    for g in head.tolist():
        lo, hi, plen = int(offsets[g]), int(offsets[g + 1]), float(prefix_len[g])
        last = -1
        while True:
            load, s = heapq.heappop(heap)
            room = share - load
            rest = plen + cum[hi] - cum[lo]
            if split and rest > room and hi - lo >= 2 and room * _SPLIT_PREFILL_BUDGET >= plen and s != last:
                cut = int(np.searchsorted(cum, cum[lo] + room - plen, side="right")) - 1
                cut = min(max(cut, lo + 1), hi - 1)
                rows.append((g, lo, cut, s))
                heapq.heappush(heap, (load + plen + cum[cut] - cum[lo], s))
                lo, last = cut, s
                continue
            rows.append((g, lo, hi, s))
            heapq.heappush(heap, (load + rest, s))
            break
    return rows, heap


def _water_fill(loads: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Give consecutive runs of items to shards so that all end near one common level."""
    total = float(costs.sum())
    order = np.argsort(loads, kind="stable")
    sorted_loads = loads[order]
    level = sorted_loads[0]
    for i in range(loads.size):  # raise the level over the i+1 lowest shards
        nxt = sorted_loads[i + 1] if i + 1 < loads.size else np.inf
        need = (i + 1) * nxt - sorted_loads[: i + 1].sum()
        if need >= total:
            level = (total + sorted_loads[: i + 1].sum()) / (i + 1)
            break
    capacity = np.maximum(level - loads, 0.0)
    bounds = np.cumsum(capacity)
    mid = np.cumsum(costs) - costs / 2
    return np.minimum(np.searchsorted(bounds, mid, side="right"), loads.size - 1)
