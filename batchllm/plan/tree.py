"""Sorted-LCP prefix structure over token ids, at KV-block granularity.

A shared prefix can only be reused in whole KV blocks, and a member must keep at
least its last prompt token for itself (its logits start generation). So the
tree is built over *usable blocks*: prompt i of length L is cut into blocks of
``block_size`` tokens, and its first ``ceil(L / B) - 1`` blocks (every block but
the one holding the last token) are the symbols of its string in the tree. Any
prefix the planner picks is then automatically a multiple of the block size and
leaves every member a non-empty suffix.

Each block is named by a 64-bit hash of its tokens (vectorized over all blocks).
Sorting the block strings (MSD radix refinement, one block per round, only over
rows that still tie with another row) gives a trie order: rows sharing any
prefix are contiguous. The LCP of adjacent rows and the trie nodes (sorted-
position intervals per depth) fall out of the same rounds. Hashes can collide,
so the planner checks every shared prefix it emits token by token and rebuilds
with another seed when a check fails (see ``groups.build_plan``): a collision
costs time, never a wrong plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_U64 = np.uint64
_CHUNK_BLOCKS = 1 << 22  # blocks hashed per chunk: bounds temporary memory to a few hundred MB


@dataclass(frozen=True, eq=False)
class TokenTable:
    """All prompts back to back: ``values[offsets[i]:offsets[i+1]]`` is prompt i.

    One flat integer array plus offsets (the Arrow list layout) instead of a
    Python object per prompt, so millions of prompts cost two arrays.
    """

    values: np.ndarray
    offsets: np.ndarray

    @property
    def n(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def from_flat(cls, values: np.ndarray, offsets: np.ndarray) -> TokenTable:
        values = np.asarray(values)
        offsets = np.asarray(offsets, dtype=np.int64)
        if values.ndim != 1 or offsets.ndim != 1 or offsets.size < 1:
            raise ValueError("prompts: expected 1-D values and 1-D offsets")
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"prompts: token ids must be integers, got {values.dtype}")
        if offsets[0] < 0 or offsets[-1] > values.size or np.any(np.diff(offsets) < 0):
            raise ValueError("prompts: offsets must be non-decreasing and within the values")
        return cls(values, offsets)

    @classmethod
    def from_prompts(cls, prompts: Any) -> TokenTable:
        """Accept a TokenTable, a pyarrow (Large/FixedSize)ListArray or ChunkedArray, a 2-D
        numpy array (one prompt per row) or a sequence of 1-D integer arrays/lists."""
        if isinstance(prompts, TokenTable):
            return prompts
        if type(prompts).__module__.split(".")[0] == "pyarrow":
            return _from_arrow(prompts)
        if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
            n, w = prompts.shape
            return cls.from_flat(prompts.reshape(-1), np.arange(n + 1, dtype=np.int64) * w)
        if not isinstance(prompts, Sequence) and not isinstance(prompts, np.ndarray):
            raise TypeError(f"prompts: unsupported type {type(prompts).__name__}")
        n = len(prompts)
        lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if n == 0 or offsets[-1] == 0:
            return cls.from_flat(np.zeros(0, dtype=np.int32), offsets)
        values = np.concatenate([np.asarray(p) for p in prompts if len(p)])
        return cls.from_flat(values, offsets)


def _from_arrow(arr: Any) -> TokenTable:
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if arr.null_count:
        raise ValueError("prompts: null prompts are not allowed")
    if isinstance(arr, pa.FixedSizeListArray):
        flat = arr.flatten()
        width = arr.type.list_size
        offsets = np.arange(len(arr) + 1, dtype=np.int64) * width
        values = flat
    elif isinstance(arr, pa.ListArray | pa.LargeListArray):
        offsets = np.asarray(arr.offsets, dtype=np.int64)
        values = arr.values
    else:
        raise TypeError(f"prompts: expected an Arrow list array, got {arr.type}")
    if values.null_count:
        raise ValueError("prompts: null token ids are not allowed")
    return TokenTable.from_flat(values.to_numpy(zero_copy_only=False), offsets)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, in place on a uint64 array: spreads every input bit over the word."""
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def _position_keys(block_size: int, seed: int) -> np.ndarray:
    keys = _mix(np.arange(1, block_size + 1, dtype=np.uint64) * _U64(0x9E3779B97F4A7C15) + _U64(seed))
    return keys | _U64(1)  # odd multipliers are invertible mod 2^64


@dataclass(frozen=True, eq=False)
class BlockHashes:
    """Hash of every block of every prompt; blocks of prompt i are ``hashes[start[i]:start[i+1]]``.

    The last block of a prompt may be partial (1..B tokens); its length is part
    of its hash. Hashes are never 0, so 0 can mark "string ended" in the sort.
    """

    hashes: np.ndarray
    start: np.ndarray

    @property
    def count(self) -> np.ndarray:
        return np.diff(self.start)


def block_hashes(table: TokenTable, block_size: int, seed: int = 0) -> BlockHashes:
    lengths = table.lengths
    nblocks = (lengths + block_size - 1) // block_size
    start = np.zeros(table.n + 1, dtype=np.int64)
    np.cumsum(nblocks, out=start[1:])
    total = int(start[-1])
    out = np.empty(total, dtype=np.uint64)
    keys = _position_keys(block_size, seed)
    values, offsets = table.values, table.offsets
    last = max(values.size - 1, 0)
    for lo in range(0, total, _CHUNK_BLOCKS):
        hi = min(total, lo + _CHUNK_BLOCKS)
        ids = np.arange(lo, hi, dtype=np.int64)
        row = np.searchsorted(start, ids, side="right") - 1
        k = ids - start[row]
        first = offsets[row] + k * block_size
        blen = np.minimum(block_size, lengths[row] - k * block_size)
        h = np.full(hi - lo, _U64(seed) ^ _U64(0x243F6A8885A308D3), dtype=np.uint64)
        for u in range(block_size):
            idx = np.minimum(first + u, last)
            tok = values[idx].astype(np.uint64)
            if u:
                tok[blen <= u] = 0
            h ^= tok
            h *= keys[u]
            h ^= h >> _U64(29)
        h ^= blen.astype(np.uint64) * _U64(0xD6E8FEB86659FD93)
        _mix(h)
        h[h == 0] = 1
        out[lo:hi] = h
    return BlockHashes(out, start)


def row_hashes(bh: BlockHashes, seed: int) -> np.ndarray:
    """A position-sensitive 64-bit hash of each whole prompt (from its block hashes)."""
    count = bh.count
    k = np.arange(bh.hashes.size, dtype=np.uint64) - np.repeat(bh.start[:-1], count).astype(np.uint64)
    x = bh.hashes ^ _mix(k * _U64(0x9E3779B97F4A7C15) + _U64(seed))
    _mix(x)
    if np.any(count == 0):
        raise ValueError("prompts: empty prompts are not allowed")
    if x.size == 0:
        return np.zeros(count.size, dtype=np.uint64)
    return np.add.reduceat(x, bh.start[:-1])


@dataclass(frozen=True, eq=False)
class Trie:
    """Trie order of a set of rows over their usable blocks.

    order: row ids (input indices) in trie order. lcp[p]: number of usable
    blocks shared by ``order[p-1]`` and ``order[p]`` (lcp[0] = 0). levels[d-1]:
    the trie nodes at depth d blocks that hold at least two rows, as sorted
    half-open position intervals ``(starts, ends)``; nodes of one depth are
    disjoint and each lies inside exactly one node of the depth above.
    """

    order: np.ndarray
    lcp: np.ndarray
    levels: list[tuple[np.ndarray, np.ndarray]]


def build_trie(rows: np.ndarray, usable: np.ndarray, bh: BlockHashes) -> Trie:
    """MSD radix refinement: round j orders every still-tied segment by its rows' block j.

    Only rows that tie with another row on all blocks so far stay active, and
    only segments whose keys differ are sorted, so the cost follows the shared
    structure rather than the prompt lengths.
    """
    n = rows.size
    order = rows.astype(np.int64, copy=True)
    lcp = np.zeros(n, dtype=np.int64)
    levels: list[tuple[np.ndarray, np.ndarray]] = []
    pos = np.arange(n, dtype=np.int64)
    seg = np.zeros(n, dtype=np.int64)
    hashes, start = bh.hashes, bh.start
    j = 0
    while pos.size > 1:
        r = order[pos]
        has = usable[r] > j
        key = np.zeros(pos.size, dtype=np.uint64)
        key[has] = hashes[start[r[has]] + j]
        same = seg[1:] == seg[:-1]
        change = same & (key[1:] != key[:-1])
        if change.any():
            seg_first = np.flatnonzero(np.concatenate(([True], ~same)))
            varies = np.logical_or.reduceat(np.concatenate((change, [False])), seg_first)
            sizes = np.diff(np.append(seg_first, pos.size))
            sub = np.flatnonzero(np.repeat(varies, sizes))
            perm = np.lexsort((key[sub], seg[sub]))
            r[sub] = r[sub][perm]
            key[sub] = key[sub][perm]
            order[pos] = r
            change = same & (key[1:] != key[:-1])
        lcp[pos[1:][change]] = j
        flags = np.concatenate(([True], ~same | change))
        run_first = np.flatnonzero(flags)
        run_size = np.diff(np.append(run_first, pos.size))
        run_id = np.cumsum(flags) - 1
        run_key = key[run_first]
        node = (run_size >= 2) & (run_key != 0)
        levels.append((pos[run_first[node]], pos[run_first[node] + run_size[node] - 1] + 1))
        ended_pair = ~flags & (key == 0)  # rows with equal usable blocks that all end here
        lcp[pos[ended_pair]] = j
        keep = node[run_id]
        seg = pos[run_first][run_id][keep]
        pos = pos[keep]
        j += 1
    while levels and levels[-1][0].size == 0:
        levels.pop()
    return Trie(order, lcp, levels)


def concat_ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[k], starts[k] + lens[k]) for all k, without a Python loop."""
    lens = np.asarray(lens, dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.asarray(starts, dtype=np.int64) - (np.cumsum(lens) - lens)
    return np.repeat(shift, lens) + np.arange(total, dtype=np.int64)
