"""Groups from the prefix trie: first-level prefix maximization, then ``build_plan``.

Model (BatchLLM, DESIGN 4.1): every group computes its shared prefix once
(prefill only) and each member then computes only its own suffix. The
first-level nodes of the trie (children of the root) are the starting groups.
Bottom-up, a deeper node g inside first-level node c is promoted to a group of
its own when ``(leaves(g) - 1) * len(g) - len(c) > 0``: its still-unclaimed
leaves then skip ``len(g)`` more tokens each, at the price of computing c's
tokens once more. ``leaves(g)`` counts only leaves not already taken by a
promoted descendant and ``len(g)`` is g's depth beyond c, so every promotion
lowers the physical token count; a node not worth promoting relative to c is
never worth it relative to a deeper group, hence one bottom-up pass suffices.
Lengths are counted in whole KV blocks (see ``tree``), the unit a prefix is
shared in; groups left with one member become plain requests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .order import execution_order, permute_groups
from .tree import (
    HashCollision,
    TokenTable,
    Trie,
    as_words,
    build_trie,
    concat_ranges,
    hash_words,
    remove_positions,
)
from .types import Plan, make_plan, representative_max_tokens

_MAX_SEEDS = 4


def build_plan(
    prompts: Any,
    max_tokens: np.ndarray | int = 0,
    block_size: int = 16,
    *,
    share: bool = True,
    dedup: bool = True,
    maximize: bool = True,
    seed: int = 0,
) -> Plan:
    """Plan prompts (sequence of int arrays, Arrow list array or TokenTable) by shared prefix.

    share=False gives the trivial plan: every unique prompt plain, in input
    order (the engine's "sharing off" mode). dedup=False keeps exact duplicates
    as separate members. maximize=False stops at first-level groups.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    table = TokenTable.from_prompts(prompts)
    n = table.n
    lengths = table.lengths
    if n and lengths.min() < 1:
        raise ValueError("prompts: empty prompts are not allowed")
    mt = np.broadcast_to(np.asarray(max_tokens, dtype=np.int64), (n,)).copy()
    if n and mt.min() < 0:
        raise ValueError("max_tokens must be >= 0")
    if not share:
        duplicate_of = np.arange(n, dtype=np.int64)
        if dedup and n > 1:
            _collapse_duplicates(
                table, _trie_with_retries(table, block_size, seed), block_size, duplicate_of, seed
            )
        reps = np.flatnonzero(duplicate_of == np.arange(n))
        no_prefix = np.zeros(reps.size, dtype=np.int64)
        return make_plan(table, mt, duplicate_of, no_prefix, np.arange(reps.size + 1), reps, block_size)
    trie = _trie_with_retries(table, block_size, seed)
    duplicate_of = np.arange(n, dtype=np.int64)
    if dedup:
        trie = _collapse_duplicates(table, trie, block_size, duplicate_of, seed)
    depth, offsets, positions = choose_groups(trie, maximize)
    members = trie.order[positions]
    plain = np.setdiff1d(trie.order, members, assume_unique=True)
    prefix_len = np.concatenate((depth * block_size, np.zeros(plain.size, dtype=np.int64)))
    offsets = np.concatenate((offsets, offsets[-1] + np.arange(1, plain.size + 1)))
    members = np.concatenate((members, plain))
    rep_mt = representative_max_tokens(duplicate_of, mt)
    perm = execution_order(prefix_len, offsets, members, lengths, rep_mt)
    prefix_len, offsets, members = permute_groups(prefix_len, offsets, members, perm)
    first_level = _first_level_physical(trie, lengths, block_size)
    return make_plan(table, mt, duplicate_of, prefix_len, offsets, members, block_size, first_level)


def _trie_with_retries(table: TokenTable, block_size: int, seed: int) -> Trie:
    """The exact trie; a block-hash collision (detected, never silent) means another seed."""
    for attempt in range(_MAX_SEEDS):
        try:
            return build_trie(table, block_size, seed + attempt)
        except HashCollision:
            continue
    raise RuntimeError("planner: block hashes kept colliding; this should not happen")


def choose_groups(trie: Trie, maximize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply first-level maximization on the trie.

    Returns (depth in blocks per group, CSR member offsets, trie positions of the
    members) for every group of >= 2 members; positions of a group are in trie
    order. Rows in no such group are plain requests.
    """
    levels, lcp = trie.levels, trie.lcp
    empty = np.zeros(0, dtype=np.int64)
    if not levels:
        return empty, np.zeros(1, dtype=np.int64), empty
    s1, e1 = levels[0]
    first_depth = interval_min(lcp, s1 + 1, e1)
    chosen: list[tuple[int, np.ndarray, np.ndarray]] = []
    child_start = child_claim = None
    for d in range(len(levels), 0, -1):
        s, e = levels[d - 1]
        leaves = e - s
        claimed = np.zeros(s.size, dtype=np.int64)
        if child_start is not None and child_start.size:
            parent = np.searchsorted(s, child_start, side="right") - 1
            claimed = np.bincount(parent, weights=child_claim, minlength=s.size).astype(np.int64)
        remaining = leaves - claimed
        cd = first_depth[np.searchsorted(s1, s, side="right") - 1]
        promote = d == cd
        if maximize:
            promote |= (d > cd) & ((remaining - 1) * (d - cd) > cd)
        child_start, child_claim = s, np.where(promote, leaves, claimed)
        if promote.any():
            chosen.append((d, s[promote], e[promote]))
    owner = np.full(trie.order.size, -1, dtype=np.int64)
    depths = []
    gid = 0
    for d, s, e in chosen:  # deepest first: a position belongs to its deepest chosen node
        lens = e - s
        idx = concat_ranges(s, lens)
        ids = np.repeat(np.arange(gid, gid + s.size, dtype=np.int64), lens)
        free = owner[idx] < 0
        owner[idx[free]] = ids[free]
        depths.append(np.full(s.size, d, dtype=np.int64))
        gid += s.size
    depth = np.concatenate(depths) if depths else empty
    counts = np.bincount(owner[owner >= 0], minlength=gid)
    keep = counts >= 2
    renum = np.cumsum(keep) - 1
    pos = np.flatnonzero(owner >= 0)
    pos = pos[keep[owner[pos]]]
    new_owner = renum[owner[pos]]
    pos = pos[np.argsort(new_owner, kind="stable")]
    offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(counts[keep], out=offsets[1:])
    return depth[keep], offsets, pos


def interval_min(a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min(a[lo[k]:hi[k]]) for sorted, non-empty, non-overlapping intervals."""
    if lo.size == 0:
        return np.zeros(0, dtype=a.dtype)
    ext = np.append(a, a.max(initial=0))
    bounds = np.empty(2 * lo.size, dtype=np.int64)
    bounds[0::2], bounds[1::2] = lo, hi
    return np.minimum.reduceat(ext, bounds)[0::2]


def _first_level_physical(trie: Trie, lengths: np.ndarray, block_size: int) -> int:
    """Physical tokens of the plan without maximization (first-level groups only)."""
    total = int(lengths[trie.order].sum())
    if not trie.levels:
        return total
    s1, e1 = trie.levels[0]
    depth = interval_min(trie.lcp, s1 + 1, e1)
    return total - int(((e1 - s1 - 1) * depth).sum()) * block_size


def _collapse_duplicates(
    table: TokenTable, trie: Trie, block_size: int, duplicate_of: np.ndarray, seed: int
) -> Trie:
    """Find exact duplicates among rows that ended tied in the trie (same usable blocks):
    they are duplicates when their last, partial block and length match too. Fills
    duplicate_of (the lowest input index of each set represents it) and returns the
    trie without the other copies."""
    cand = np.flatnonzero(trie.tie >= 0)
    if cand.size == 0:
        return trie
    rows = trie.order[cand]
    dup = _equal_tails(table, rows, trie.tie[cand], block_size, seed)
    duplicate_of[rows] = rows[dup]
    return remove_positions(trie, cand[dup != np.arange(cand.size)])


def _equal_tails(
    table: TokenTable, rows: np.ndarray, run: np.ndarray, block_size: int, seed: int
) -> np.ndarray:
    """For rows already known to agree within each ``run`` label up to their last block: index
    (into rows) of the lowest-index row with the same run, length and last block."""
    lengths = table.lengths[rows]
    start = (lengths - 1) // block_size * block_size
    idx = (table.offsets[rows] + start)[:, None] + np.arange(block_size, dtype=np.int64)
    inside = np.arange(block_size) < (lengths - start)[:, None]
    tail = np.where(inside, table.values[np.minimum(idx, max(table.values.size - 1, 0))], -1)
    words = np.concatenate((as_words(tail), lengths.astype(np.uint64)[:, None]), axis=1)
    key = hash_words(words, seed)
    order = np.lexsort((rows, key, run))
    w = words[order]
    same_run = (run[order][1:] == run[order][:-1]) & (key[order][1:] == key[order][:-1])
    same = same_run & (w[1:] == w[:-1]).all(axis=1)
    if (same_run & ~same).any():  # a hash collision: fall back to sorting the words themselves
        order = np.lexsort((rows, *words.T[::-1], run))
        w = words[order]
        same = (run[order][1:] == run[order][:-1]) & (w[1:] == w[:-1]).all(axis=1)
    flags = np.concatenate(([True], ~same))
    first = order[np.flatnonzero(flags)][np.cumsum(flags) - 1]
    out = np.empty(rows.size, dtype=np.int64)
    out[order] = first
    return out
