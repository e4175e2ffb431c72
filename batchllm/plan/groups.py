"""Groups from the prefix trie: first-level prefix maximization, the Plan, its stats.

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

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

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

_MAX_SEEDS = 4


@dataclass(frozen=True)
class Group:
    """One unit of execution: compute ``prefix`` once, then each member's suffix."""

    index: int
    prefix_len: int
    prefix: np.ndarray
    members: np.ndarray


@dataclass
class PlanStats:
    """Token accounting of a plan. logical counts every input prompt in full (duplicates
    included); physical counts what is computed: each prefix once plus every unique
    member's suffix. saving_ratio = 1 - physical / logical."""

    prompts: int
    unique_prompts: int
    duplicates: int
    groups: int
    plain: int
    shared_members: int
    logical_tokens: int
    physical_tokens: int
    saving_ratio: float
    decode_tokens: int
    prefix_len_hist: dict[str, int] = field(default_factory=dict)
    sharing_hist: dict[str, int] = field(default_factory=dict)
    physical_tokens_first_level: int | None = None
    saving_ratio_first_level: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Plan:
    """Groups in execution order, as CSR numpy arrays.

    Group k has prefix length ``prefix_len[k]`` (a multiple of ``block_size``; 0
    for a plain request) and members ``members[member_offsets[k]:member_offsets[k+1]]``
    (input indices of unique prompts, in execution order). Every member's suffix
    starts at its group's prefix_len and holds at least one token.
    ``duplicate_of[i]`` is the representative input index of input i (itself for
    representatives); only representatives appear as members, the others get
    their answer fanned out. A shard (``order.shard_plan``) is a Plan over a
    subset of the groups; its arrays still use global input indices.
    """

    table: TokenTable
    max_tokens: np.ndarray
    duplicate_of: np.ndarray
    prefix_len: np.ndarray
    member_offsets: np.ndarray
    members: np.ndarray
    block_size: int
    stats: PlanStats

    @property
    def num_groups(self) -> int:
        return int(self.prefix_len.size)

    def __len__(self) -> int:
        return self.num_groups

    @property
    def group_sizes(self) -> np.ndarray:
        return np.diff(self.member_offsets)

    @property
    def suffix_start(self) -> np.ndarray:
        """Per entry of ``members``: where its own tokens start (its group's prefix_len)."""
        return np.repeat(self.prefix_len, self.group_sizes)

    @property
    def member_max_tokens(self) -> np.ndarray:
        """Per entry of ``members``: the largest max_tokens among the inputs it answers."""
        return representative_max_tokens(self.duplicate_of, self.max_tokens)[self.members]

    def group(self, k: int) -> Group:
        lo, hi = int(self.member_offsets[k]), int(self.member_offsets[k + 1])
        members = self.members[lo:hi]
        plen = int(self.prefix_len[k])
        start = int(self.table.offsets[members[0]])
        return Group(k, plen, self.table.values[start : start + plen], members)

    def iter_groups(self) -> Iterator[Group]:
        for k in range(self.num_groups):
            yield self.group(k)

    def inputs(self) -> np.ndarray:
        """Input indices this plan answers (members and their duplicates), ascending."""
        covered = np.zeros(self.duplicate_of.size, dtype=bool)
        covered[self.members] = True
        return np.flatnonzero(covered[self.duplicate_of])

    def input_slots(self) -> np.ndarray:
        """Map back to input order: for each input index, the position in ``members`` of the
        member that answers it (its representative), or -1 when another shard answers it."""
        slot = np.full(self.duplicate_of.size, -1, dtype=np.int64)
        slot[self.members] = np.arange(self.members.size, dtype=np.int64)
        return slot[self.duplicate_of]

    def to_arrow(self) -> Any:
        """One row per group: group, prefix_len, members (list<int64>), prefix (list<int32>)."""
        import pyarrow as pa

        firsts = self.members[self.member_offsets[:-1]] if self.num_groups else np.zeros(0, np.int64)
        starts = self.table.offsets[firsts]
        pref_off = np.zeros(self.num_groups + 1, dtype=np.int64)
        np.cumsum(self.prefix_len, out=pref_off[1:])
        idx = concat_ranges(starts, self.prefix_len)
        prefix = pa.LargeListArray.from_arrays(pa.array(pref_off), pa.array(self.table.values[idx]))
        members = pa.LargeListArray.from_arrays(pa.array(self.member_offsets), pa.array(self.members))
        return pa.table(
            {
                "group": pa.array(np.arange(self.num_groups, dtype=np.int64)),
                "prefix_len": pa.array(self.prefix_len.astype(np.int64)),
                "members": members,
                "prefix": prefix,
            }
        )


def representative_max_tokens(duplicate_of: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
    """max_tokens of each representative = the largest over the inputs it answers."""
    out = max_tokens.copy()
    dup = np.flatnonzero(duplicate_of != np.arange(duplicate_of.size))
    if dup.size:
        np.maximum.at(out, duplicate_of[dup], max_tokens[dup])
    return out


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
    from .order import execution_order, permute_groups

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


def make_plan(
    table: TokenTable,
    max_tokens: np.ndarray,
    duplicate_of: np.ndarray,
    prefix_len: np.ndarray,
    member_offsets: np.ndarray,
    members: np.ndarray,
    block_size: int,
    physical_first_level: int | None = None,
) -> Plan:
    """A Plan over these groups, with its token accounting (PlanStats)."""
    prefix_len = np.asarray(prefix_len, dtype=np.int64)
    member_offsets = np.asarray(member_offsets, dtype=np.int64)
    members = np.asarray(members, dtype=np.int64)
    lengths = table.lengths
    multiplicity = np.bincount(duplicate_of, minlength=duplicate_of.size)[members]
    sizes = np.diff(member_offsets)
    shared = (prefix_len > 0) & (sizes >= 2)
    mlen = lengths[members]
    logical = int((mlen * multiplicity).sum())
    physical = int(mlen.sum() - ((sizes - 1) * prefix_len).sum())
    prompts = int(multiplicity.sum())
    rep_mt = representative_max_tokens(duplicate_of, max_tokens)

    def saving(physical_tokens: int) -> float:
        return (1.0 - physical_tokens / logical) if logical else 0.0

    stats = PlanStats(
        prompts=prompts,
        unique_prompts=int(members.size),
        duplicates=prompts - int(members.size),
        groups=int(shared.sum()),
        plain=int((~shared).sum()),
        shared_members=int(sizes[shared].sum()),
        logical_tokens=logical,
        physical_tokens=physical,
        saving_ratio=saving(physical),
        decode_tokens=int(rep_mt[members].sum()),
        prefix_len_hist=pow2_histogram(prefix_len[shared]),
        sharing_hist=pow2_histogram(sizes[shared]),
    )
    if physical_first_level is not None:
        stats.physical_tokens_first_level = int(physical_first_level)
        stats.saving_ratio_first_level = saving(physical_first_level)
    return Plan(table, max_tokens, duplicate_of, prefix_len, member_offsets, members, block_size, stats)


def pow2_histogram(values: np.ndarray) -> dict[str, int]:
    """Counts in power-of-two bins [2^k, 2^(k+1)), labelled "lo-hi" (inclusive)."""
    values = np.asarray(values, dtype=np.int64)
    values = values[values > 0]
    if values.size == 0:
        return {}
    k = np.floor(np.log2(values)).astype(np.int64)
    k -= (np.int64(1) << k) > values  # guard float rounding
    k += (np.int64(1) << (k + 1)) <= values
    counts = np.bincount(k)
    out: dict[str, int] = {}
    for b in np.flatnonzero(counts):
        lo, hi = 1 << int(b), (1 << (int(b) + 1)) - 1
        out[str(lo) if lo == hi else f"{lo}-{hi}"] = int(counts[b])
    return out


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
