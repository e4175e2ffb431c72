"""When two-level attention pays, per group and step: the cost model the scheduler applies.

Two-level attention reads a group's prefix once for all its members in the
step instead of once per member, but it writes and merges two partial results
per query row and runs a prefix tile that a plain launch does not. In units of
keys read (one key = one token's K and V of every kv head: the decode step is
bandwidth bound):

    plain     = m * (P + own)
    two-level = P + m * own + m * MERGE_KEYS + TILE_KEYS

so a group of m members with a P-token prefix takes the two-level path when
(m - 1) * P > m * MERGE_KEYS + TILE_KEYS. Constants from one layer of decode
on an H200 (bench/attention.py, bench/RESULTS.md 2026-12-03; 32/8 heads,
head_dim 128, bf16): groups of one (sd=1, P=2000) lose 5% on two-level
(3.65 vs 3.48 ms), the cost of ~110 keys per member, taken as 16 per member
for the merge plus 96 per group for the prefix tile; P=512 with 4 members wins
1.3x (0.81-0.88 vs 1.15 ms) and P=2000 with 16 members 3.1x (0.76 vs 2.39 ms),
both far above the line. Under the model a pair of members needs P >= 144 and
four members P >= 64 (block-aligned prefixes: 64 is the first that passes).
The plain path computes the same attention (member block tables start with the
prefix blocks), so the choice changes speed, never results. ENABLED = False
sends every group to it: a benchmark's plain side of the same shared KV
(``bench.config_ab``'s ``{"two_level": 0}``).
"""

from __future__ import annotations

MERGE_KEYS = 16
TILE_KEYS = 96
ENABLED = True


def two_level_pays(members: int, prefix_len: int) -> bool:
    """True when a group of ``members`` chunks in one step should read its ``prefix_len`` prefix once."""
    return ENABLED and members > 1 and (members - 1) * prefix_len > members * MERGE_KEYS + TILE_KEYS
