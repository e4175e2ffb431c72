"""Sorted-LCP prefix structure over token ids, at KV-block granularity.

A shared prefix can only be reused in whole KV blocks, and a member must keep at
least its last prompt token for itself (its logits start generation). So the
tree is built over *usable blocks*: prompt i of length L is cut into blocks of
``block_size`` tokens, and its first ``ceil(L / B) - 1`` blocks (every block but
the one holding the last token) are the symbols of its string in the tree. Any
prefix the planner picks is then automatically a multiple of the block size and
leaves every member a non-empty suffix.

Rows are sorted MSD-radix style, one block per round, and only rows that
still tie with another row stay in play: this gives the trie order (rows
sharing any prefix are contiguous), the LCP of adjacent rows and the trie nodes
(sorted-position intervals per depth) in one pass whose cost follows the shared
structure, not the prompt lengths. Blocks are compared exactly (as 64-bit
words); a 64-bit hash is used only to sort a segment whose rows differ, and
every run of equal hashes is checked exactly, so a hash collision can cost a
rebuild with another seed but never merge different prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_U64 = np.uint64


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


def _word_keys(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    base = np.arange(1, 2 * count + 1, dtype=np.uint64) * _U64(0x9E3779B97F4A7C15) + _U64(seed)
    keys = _mix(base)
    return keys[:count], keys[count:] | _U64(1)  # (xor masks, odd multipliers)


def hash_words(words: np.ndarray, seed: int) -> np.ndarray:
    """A nonzero 64-bit hash of each row of a 2-D uint64 array (used to sort, never trusted)."""
    masks, mults = _word_keys(words.shape[1], seed)
    h = np.zeros(words.shape[0], dtype=np.uint64)
    for w in range(words.shape[1]):
        h += (words[:, w] ^ masks[w]) * mults[w]
        h ^= h >> _U64(29)
    _mix(h)
    h[h == 0] = 1
    return h


class BlockReader:
    """Reads one block of B tokens for many rows at once, as rows of uint64 words.

    A strided view gives every token position a B-token record, so a gather is
    one small memcpy per row instead of B element lookups. Two ids share a word
    when all ids fit in 32 bits; the words depend on the ids only, not on the
    input dtype, so int32 Arrow lists and int64 arrays give the same plan.
    """

    def __init__(self, values: np.ndarray, block_size: int) -> None:
        narrow = _fits_int32(values)
        self.dtype = np.dtype(np.int32 if narrow else np.int64)
        self.values = np.ascontiguousarray(values, dtype=self.dtype)
        self.block_size = block_size
        self.pad = narrow and block_size % 2 == 1
        self.nwords = (block_size + 1) // 2 if narrow else block_size
        count = self.values.size - block_size + 1
        itemsize = self.dtype.itemsize
        self.view = (
            np.ndarray(
                (count,),
                dtype=np.dtype((np.void, block_size * itemsize)),
                buffer=self.values,
                strides=(itemsize,),
            )
            if count > 0
            else None
        )

    def read(self, starts: np.ndarray) -> np.ndarray:
        """Words of tokens [s, s + B) for each start s (starts must leave B tokens in the array)."""
        if self.view is None or starts.size == 0:
            return np.zeros((starts.size, self.nwords), dtype=np.uint64)
        mat = self.view[starts].view(self.dtype).reshape(starts.size, self.block_size)
        if self.pad:
            mat = np.concatenate((mat, np.zeros((starts.size, 1), dtype=self.dtype)), axis=1)
        return mat.view(np.uint64)


def as_words(mat: np.ndarray) -> np.ndarray:
    """Rows of token ids as rows of uint64 words, one id per word.

    The words depend on the ids only, not on the input dtype, so plans are the
    same whether the prompts came as int32 Arrow lists or int64 numpy arrays.
    """
    return mat.astype(np.int64).view(np.uint64)


def _fits_int32(values: np.ndarray) -> bool:
    if values.dtype in (np.int32, np.int16, np.int8, np.uint16, np.uint8):
        return True
    if values.size == 0:
        return True
    return bool(values.min() >= -(2**31) and values.max() < 2**31)


@dataclass(frozen=True, eq=False)
class Trie:
    """Trie order of a set of rows over their usable blocks.

    order: row ids (input indices) in trie order. lcp[p]: number of usable
    blocks shared by ``order[p-1]`` and ``order[p]`` (lcp[0] = 0). levels[d-1]:
    the trie nodes at depth d blocks that hold at least two rows, as sorted
    half-open position intervals ``(starts, ends)``; nodes of one depth are
    disjoint and each lies inside exactly one node of the depth above.
    tie[p] >= 0 when row order[p] ended (ran out of usable blocks) together
    with other rows holding the very same usable blocks: the trie position of
    the first of them. Only such rows can be exact duplicates.
    """

    order: np.ndarray
    lcp: np.ndarray
    levels: list[tuple[np.ndarray, np.ndarray]]
    tie: np.ndarray


class HashCollision(Exception):
    """Two different blocks got the same hash; the caller rebuilds with another seed."""


def build_trie(table: TokenTable, block_size: int, seed: int = 0) -> Trie:
    """MSD radix refinement over usable blocks: round j orders every still-tied segment by
    its rows' block j.

    Only rows that tie with another row on all blocks so far stay active. A
    segment whose rows all hold the same block j (checked exactly, word by word)
    needs no sort; the others are sorted by a hash of the block, and runs of
    equal hash are checked exactly too, so the trie is exact: a collision raises
    HashCollision instead of merging different prefixes.
    """
    n = table.n
    usable = (table.lengths - 1) // block_size
    order = np.arange(n, dtype=np.int64)
    lcp = np.zeros(n, dtype=np.int64)
    tie = np.full(n, -1, dtype=np.int64)
    levels: list[tuple[np.ndarray, np.ndarray]] = []
    pos = np.arange(n, dtype=np.int64)
    seg = np.zeros(n, dtype=np.int64)
    reader = BlockReader(table.values, block_size)
    j = 0
    while pos.size > 1:
        r = order[pos]
        has = usable[r] > j
        words = reader.read(np.where(has, table.offsets[r] + j * block_size, 0))
        words[~has] = 0
        same = seg[1:] == seg[:-1]
        eq = same & has[1:] & has[:-1] & (words[1:] == words[:-1]).all(axis=1)
        varies_pair = same & ~eq
        if varies_pair.any():
            seg_first = np.flatnonzero(np.concatenate(([True], ~same)))
            varies = np.logical_or.reduceat(np.concatenate((varies_pair, [False])), seg_first)
            sizes = np.diff(np.append(seg_first, pos.size))
            sub = np.flatnonzero(np.repeat(varies, sizes))  # whole segments whose rows differ
            key = np.zeros(sub.size, dtype=np.uint64)
            sub_has = has[sub]
            key[sub_has] = hash_words(words[sub[sub_has]], seed)
            perm = np.lexsort((key, seg[sub]))
            src = sub[perm]
            key, w, h = key[perm], words[src], has[src]
            order[pos[sub]] = r[src]
            has[sub] = h
            pair = sub[1:] - 1  # positions (pair, pair + 1), both in sub when same[pair]
            inside = same[pair]
            eq_sub = h[1:] & h[:-1] & (w[1:] == w[:-1]).all(axis=1)
            if (inside & (key[1:] == key[:-1]) & (key[1:] != 0) & ~eq_sub).any():
                raise HashCollision(f"block hash collision at depth {j} (seed {seed})")
            eq[pair[inside]] = eq_sub[inside]
        ended = same & ~has[1:] & ~has[:-1]
        change = same & ~(eq | ended)
        lcp[pos[1:][change | ended]] = j
        flags = np.concatenate(([True], ~same | change))
        run_first = np.flatnonzero(flags)
        run_size = np.diff(np.append(run_first, pos.size))
        run_id = np.cumsum(flags) - 1
        first_has = has[run_first]
        node = (run_size >= 2) & first_has
        levels.append((pos[run_first[node]], pos[run_first[node] + run_size[node] - 1] + 1))
        tied = ((run_size >= 2) & ~first_has)[run_id]
        tie[pos[tied]] = pos[run_first][run_id][tied]
        keep = node[run_id]
        seg = pos[run_first][run_id][keep]
        pos = pos[keep]
        j += 1
    while levels and levels[-1][0].size == 0:
        levels.pop()
    return Trie(order, lcp, levels, tie)


def remove_positions(trie: Trie, drop: np.ndarray) -> Trie:
    """The trie without the rows at the given positions (e.g. exact duplicates)."""
    keep = np.ones(trie.order.size, dtype=bool)
    keep[drop] = False
    kept = np.flatnonzero(keep)
    if kept.size == trie.order.size:
        return trie
    if kept.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Trie(empty, empty, [], empty)
    # the LCP of two rows that end up adjacent is the minimum over the pairs in between
    bounds = np.concatenate(([0], kept[:-1] + 1))
    lcp = np.minimum.reduceat(trie.lcp, bounds)
    lcp[0] = 0
    before = np.concatenate(([0], np.cumsum(keep)))
    levels = []
    for s, e in trie.levels:
        ns, ne = before[s], before[e]
        big = ne - ns >= 2
        levels.append((ns[big], ne[big]))
    while levels and levels[-1][0].size == 0:
        levels.pop()
    tie = np.where(trie.tie[kept] >= 0, before[np.maximum(trie.tie[kept], 0)], -1)
    return Trie(trie.order[kept], lcp, levels, tie)


def concat_ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[k], starts[k] + lens[k]) for all k, without a Python loop."""
    lens = np.asarray(lens, dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.asarray(starts, dtype=np.int64) - (np.cumsum(lens) - lens)
    return np.repeat(shift, lens) + np.arange(total, dtype=np.int64)
