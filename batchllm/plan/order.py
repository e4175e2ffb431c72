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
A group costing more than an even share is split by members into k pieces
(each piece recomputes the prefix once) when the load that leaves the largest
shard, ``cost - cost / k``, exceeds the extra prefill ``(k - 1) * prefix_len``.
"""

from __future__ import annotations

import heapq

import numpy as np

from .groups import Plan, make_plan, representative_max_tokens
from .tree import concat_ranges

_LPT_ITEMS_PER_SHARD = 64  # the largest groups placed one by one; the rest in one vectorized fill


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
    prefix. Shards may be empty when there are fewer groups than shards.
    """
    if n < 1:
        raise ValueError("shard_plan: n must be >= 1")
    lengths = plan.table.lengths
    decode = representative_max_tokens(plan.duplicate_of, plan.max_tokens)
    prefix_len, offsets, members = plan.prefix_len, plan.member_offsets, plan.members
    prefill, dec = group_costs(prefix_len, offsets, members, lengths, decode)
    cost = prefill + dec
    rank = np.arange(prefix_len.size, dtype=np.int64)  # execution position of each item's group
    if split and n > 1 and cost.size:
        prefix_len, offsets, members, cost, rank = _split_large(
            prefix_len, offsets, members, cost, lengths, decode, float(cost.sum()) / n, n
        )
    shard = assign_shards(cost, n)
    out = []
    for s in range(n):
        pick = np.flatnonzero(shard == s)
        pick = pick[np.argsort(rank[pick], kind="stable")]
        pl, off, mem = permute_groups(prefix_len, offsets, members, pick)
        out.append(make_plan(plan.table, plan.max_tokens, plan.duplicate_of, pl, off, mem, plan.block_size))
    return out


def _split_large(
    prefix_len: np.ndarray,
    offsets: np.ndarray,
    members: np.ndarray,
    cost: np.ndarray,
    lengths: np.ndarray,
    decode: np.ndarray,
    target: float,
    n: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Replace groups worth splitting by member pieces of roughly equal cost."""
    sizes = np.diff(offsets)
    k = np.minimum(np.minimum(np.ceil(cost / max(target, 1.0)), n), sizes).astype(np.int64)
    worth = (k > 1) & (cost - cost / np.maximum(k, 1) > (k - 1) * prefix_len)
    if not worth.any():
        return prefix_len, offsets, members, cost, np.arange(prefix_len.size, dtype=np.int64)
    pl_out, size_out, rank_out, cost_out = [], [], [], []
    for g in range(prefix_len.size):
        if not worth[g]:
            pl_out.append(prefix_len[g : g + 1])
            size_out.append(sizes[g : g + 1])
            rank_out.append(np.array([g]))
            cost_out.append(cost[g : g + 1])
            continue
        mem = members[offsets[g] : offsets[g + 1]]
        own = lengths[mem] - prefix_len[g] + decode[mem]
        cum = np.cumsum(own)
        cuts = np.searchsorted(cum, cum[-1] * np.arange(1, k[g]) / k[g], side="left") + 1
        cuts = np.unique(np.clip(cuts, 1, mem.size - 1))
        bounds = np.concatenate(([0], cuts, [mem.size]))
        piece_sizes = np.diff(bounds)
        piece_cost = np.add.reduceat(own, bounds[:-1]) + prefix_len[g]
        pl_out.append(np.full(piece_sizes.size, prefix_len[g]))
        size_out.append(piece_sizes)
        rank_out.append(np.full(piece_sizes.size, g))
        cost_out.append(piece_cost.astype(np.float64))
    sizes_new = np.concatenate(size_out)
    offsets_new = np.zeros(sizes_new.size + 1, dtype=np.int64)
    np.cumsum(sizes_new, out=offsets_new[1:])
    return (
        np.concatenate(pl_out).astype(np.int64),
        offsets_new,
        members,  # pieces keep the members' order, so the member array is unchanged
        np.concatenate(cost_out),
        np.concatenate(rank_out).astype(np.int64),
    )


def assign_shards(cost: np.ndarray, n: int) -> np.ndarray:
    """Shard index per item: LPT for the largest items, water-filling for the tail."""
    out = np.zeros(cost.size, dtype=np.int64)
    if n == 1 or cost.size == 0:
        return out
    by_cost = np.lexsort((np.arange(cost.size), -cost))  # largest first, stable
    head = by_cost[: _LPT_ITEMS_PER_SHARD * n]
    heap = [(0.0, s) for s in range(n)]
    for item in head:
        load, s = heapq.heappop(heap)
        out[item] = s
        heapq.heappush(heap, (load + float(cost[item]), s))
    tail = by_cost[head.size :]
    if tail.size:
        loads = np.zeros(n)
        for load, s in heap:
            loads[s] = load
        out[tail] = _water_fill(loads, cost[tail])
    return out


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
