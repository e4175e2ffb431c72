"""A plain pointer-based radix tree planner over token ids, in pure Python.

It states the planning rules as directly as possible (one node object per
radix-tree node, one Python step per token compared), so it serves as the
oracle for the vectorized planner in tests and as the baseline it is timed
against in ``bench.plan_scale``. Same rules as ``batchllm.plan.build_plan``:
duplicates collapse onto their lowest input index; a prompt of length L can
share at most its first ``(L - 1) // B * B`` tokens; group prefixes are whole
blocks; first-level nodes are groups; a deeper node is promoted bottom-up when
``(leaves - 1) * len(g) - len(c) > 0`` (in blocks, leaves not yet claimed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class _Node:
    __slots__ = ("children", "depth", "edge", "ends")

    def __init__(self, edge: tuple[int, ...], depth: int) -> None:
        self.edge = edge
        self.depth = depth  # tokens from the root to the end of this node's edge
        self.children: dict[int, _Node] = {}
        self.ends: list[int] = []  # prompts whose usable tokens end exactly here


class RadixTree:
    """Compressed trie over token tuples."""

    def __init__(self) -> None:
        self.root = _Node((), 0)

    def insert(self, tokens: tuple[int, ...], key: int) -> None:
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                node.children[tokens[i]] = leaf = _Node(tokens[i:], len(tokens))
                leaf.ends.append(key)
                return
            edge = child.edge
            k = 0
            limit = min(len(edge), len(tokens) - i)
            while k < limit and edge[k] == tokens[i + k]:
                k += 1
            if k < len(edge):  # split the edge at k
                mid = _Node(edge[:k], node.depth + k)
                child.edge = edge[k:]
                mid.children[edge[k]] = child
                node.children[tokens[i]] = mid
                child = mid
            node, i = child, i + k
        node.ends.append(key)


def reference_plan(
    prompts: Sequence[Sequence[int]], block_size: int = 16, maximize: bool = True
) -> tuple[list[tuple[int, list[int]]], list[int], dict[int, int]]:
    """Returns (groups as (prefix_len, sorted members), plain prompts, duplicate_of)."""
    first_seen: dict[tuple[int, ...], int] = {}
    duplicate_of: dict[int, int] = {}
    tree = RadixTree()
    for i, p in enumerate(prompts):
        t = tuple(int(x) for x in p)
        rep = first_seen.setdefault(t, i)
        duplicate_of[i] = rep
        if rep == i:
            tree.insert(t[: (len(t) - 1) // block_size * block_size], i)
    groups: list[tuple[int, list[int]]] = []
    plain: list[int] = []
    stack = [tree.root]
    while stack:  # the first node on each path that is a whole block deep is a first-level node
        node = stack.pop()
        if node.depth >= block_size:
            _plan_first_level(node, block_size, maximize, groups, plain)
        else:
            plain.extend(node.ends)
            stack.extend(node.children.values())
    return groups, sorted(plain), duplicate_of


def _plan_first_level(
    c: _Node, bs: int, maximize: bool, groups: list[tuple[int, list[int]]], plain: list[int]
) -> None:
    """Plan the subtree of first-level node c (its prefix: c.depth // bs whole blocks)."""
    c_blocks = c.depth // bs
    taken: set[int] = set()
    if maximize:
        for child in c.children.values():
            _promote(child, c_blocks, c_blocks, bs, groups, taken)
    rest = [k for k in _leaves(c) if k not in taken]
    if len(rest) >= 2:
        groups.append((c_blocks * bs, sorted(rest)))
    else:
        plain.extend(rest)


def _promote(
    node: _Node,
    parent_blocks: int,
    c_blocks: int,
    bs: int,
    groups: list[tuple[int, list[int]]],
    taken: set[int],
) -> None:
    """Bottom-up: children first, then this node on its unclaimed leaves."""
    for child in node.children.values():
        _promote(child, node.depth // bs, c_blocks, bs, groups, taken)
    blocks = node.depth // bs
    if blocks == parent_blocks:  # no block boundary on this edge: not a node of the block trie
        return
    rest = [k for k in _leaves(node) if k not in taken]
    if len(rest) >= 2 and (len(rest) - 1) * (blocks - c_blocks) > c_blocks:
        groups.append((blocks * bs, sorted(rest)))
        taken.update(rest)


def _leaves(node: _Node) -> list[int]:
    out: list[int] = []
    stack = [node]
    while stack:
        n = stack.pop()
        out.extend(n.ends)
        stack.extend(n.children.values())
    return out


def reference_physical_tokens(
    prompts: Sequence[np.ndarray], groups: list[tuple[int, list[int]]], plain: list[int]
) -> int:
    """Tokens computed by a plan: each group's prefix once, every member's suffix, plain prompts whole."""
    total = sum(len(prompts[k]) for k in plain)
    for plen, members in groups:
        total += plen + sum(len(prompts[k]) - plen for k in members)
    return total
