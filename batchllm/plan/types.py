"""The planner's data types: Group, PlanStats, Plan and ``make_plan`` (the one saving-ratio formula).

They live apart from groups.py (which builds plans) and order.py (which orders
and shards them) so that both import them without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .tree import TokenTable, concat_ranges


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
