"""Per-row field reordering for shared prefixes (DESIGN 4.4): numpy only, pyarrow only for Arrow input.

When a template marks fields as reorderable, every row may list its fields in
its own order. Rows that put the same (field, value) pairs first share a longer
prompt prefix, which the global planner then computes once. Two planners:

- ``ggr``: greedy group recursion (Liu et al., "Optimizing LLM Queries in
  Relational Workloads"). Score each value v of column c by
  ``len(v)^2 * (rows holding v - 1)``, put the best value first for the rows
  holding it, recurse on those rows with the other columns, and repeat on the
  rows left. Counts are kept incrementally (the rows of a picked value are
  subtracted) and the best value comes from a lazy max-heap, so a node costs
  about ``rows * columns * log`` rather than that per pick. Groups of at most
  ``row_stop`` rows or ``col_stop`` columns take one column order (by score)
  and a sort, as the paper's quick-greedy does.
- ``level``: the same score, decided for all rows at once, one field position
  at a time. Each row takes its own best-scoring (column, value), counted
  within the rows that agree with it on the fields placed so far; then the
  rows are split by that choice. A few vectorized passes (one per field), no
  per-group Python loop: much cheaper to plan, close to GGR's reuse.

Both return, per row, a permutation of the columns and a row order (rows with
shared prefixes adjacent), and never do worse than the declared order on the
field-granular prefix-hit count (``prefix_hits``): if they would, the
declared order is returned. Everything is deterministic for a given table.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Method = Literal["none", "ggr", "level"]
METHODS: tuple[str, ...] = ("none", "ggr", "level")


@dataclass(frozen=True)
class FieldTable:
    """Dictionary-encoded columns: ``codes[i, j]`` is row i's value id in column j.

    Value ids are global (unique over all columns), so a (column, value) pair is one int;
    ``lengths[id]`` is the value's rendered length (name + text), ``column[id]`` its column.
    """

    names: list[str]
    codes: np.ndarray  # (rows, columns) int64 global value ids
    lengths: np.ndarray  # (values,) int64
    column: np.ndarray  # (values,) int64

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]


@dataclass(frozen=True)
class FieldOrder:
    """The planned order: ``order[i]`` lists row i's column indices first to last; ``rows`` an execution
    order that keeps rows with shared prefixes adjacent; ``hits`` the field-granular prefix-hit count."""

    order: np.ndarray  # (rows, columns) int64
    rows: np.ndarray  # (rows,) int64
    hits: int
    method: str

    def names(self, names: Sequence[str]) -> list[list[str]]:
        """Per row, the column names in planned order."""
        table = np.asarray(names, dtype=object)[self.order]
        return table.tolist()


def encode(columns: Mapping[str, Any], names: Sequence[str] | None = None) -> FieldTable:
    """Encode columns (Arrow arrays / chunked arrays or Python sequences of equal length).

    A value's length is ``len(name) + len(str(value))`` (nulls count as "None"): what a template
    like ``{{ name }}: {{ value }}`` renders, up to a constant per field.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    names = list(columns) if names is None else list(names)
    codes, lengths, column = [], [], []
    offset = 0
    for j, name in enumerate(names):
        col = columns[name]
        arr = col if isinstance(col, pa.Array | pa.ChunkedArray) else pa.array(list(col))
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        try:
            enc = pc.dictionary_encode(arr, null_encoding="encode")
        except pa.ArrowNotImplementedError:  # nested types: encode their text
            arr = pa.array([None if v is None else str(v) for v in arr.to_pylist()], pa.string())
            enc = pc.dictionary_encode(arr, null_encoding="encode")
        values = enc.dictionary.to_pylist()
        idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        codes.append(idx + offset)
        lengths.append(np.fromiter((len(name) + len(str(v)) for v in values), np.int64, len(values)))
        column.append(np.full(len(values), j, np.int64))
        offset += len(values)
    n = len(codes[0]) if codes else 0
    return FieldTable(
        names=names,
        codes=np.stack(codes, axis=1) if codes else np.zeros((n, 0), np.int64),
        lengths=np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
        column=np.concatenate(column) if column else np.zeros(0, np.int64),
    )


def prefix_hits(table: FieldTable, order: np.ndarray) -> int:
    """Characters of each row's field sequence shared with some other row's prefix, whole fields only.

    Equals the trie saving (total minus distinct trie length), so it does not depend on row order:
    sort the rows' sequences, a row's best match is its sorted predecessor.
    """
    n, m = table.shape
    if n < 2 or m == 0:
        return 0
    seq = np.take_along_axis(table.codes, order, axis=1)
    seq = seq[np.lexsort(seq.T[::-1])]
    same = np.logical_and.accumulate(seq[1:] == seq[:-1], axis=1)
    return int((table.lengths[seq[1:]] * same).sum())


def reorder(
    table: FieldTable, method: Method = "level", *, row_stop: int = 4, col_stop: int = 2
) -> FieldOrder:
    """Plan per-row field orders and a row order; the declared order when that shares more."""
    n, m = table.shape
    declared = np.broadcast_to(np.arange(m, dtype=np.int64), (n, m))
    base = FieldOrder(declared.copy(), _sorted_rows(table, declared), prefix_hits(table, declared), "none")
    if method == "none" or n < 2 or m < 2:
        return base
    if method == "ggr":
        order, rows = _ggr(table, row_stop=row_stop, col_stop=col_stop)
    elif method == "level":
        order = _level(table)
        rows = _sorted_rows(table, order)
    else:
        raise ValueError(f"unknown reorder method {method!r} (one of {', '.join(METHODS)})")
    hits = prefix_hits(table, order)
    return FieldOrder(order, rows, hits, method) if hits >= base.hits else base


def _sorted_rows(table: FieldTable, order: np.ndarray) -> np.ndarray:
    """Rows sorted by their field sequences (stable), so shared prefixes are adjacent."""
    if table.shape[1] == 0:
        return np.arange(table.shape[0], dtype=np.int64)
    seq = np.take_along_axis(table.codes, order, axis=1)
    return np.lexsort(seq.T[::-1]).astype(np.int64)


def _local_counts(table: FieldTable, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct values of ``rows`` x ``cols``: (value ids, per-cell local index, counts, scores)."""
    sub = table.codes[np.ix_(rows, cols)]
    uniq, inv, cnt = np.unique(sub, return_inverse=True, return_counts=True)
    length = table.lengths[uniq]
    return uniq, inv.reshape(sub.shape), cnt, length * length * (cnt - 1)


class _GGR:
    """One GGR run: fills ``order`` row by row and appends finished rows to ``out`` in DFS order."""

    def __init__(self, table: FieldTable, row_stop: int, col_stop: int) -> None:
        self.t = table
        self.row_stop = max(row_stop, 1)
        self.col_stop = max(col_stop, 1)
        self.order = np.empty(table.shape, dtype=np.int64)
        self.out: list[np.ndarray] = []

    def finish(self, rows: np.ndarray, prefix: list[int], cols: np.ndarray) -> None:
        self.order[rows] = np.concatenate([np.asarray(prefix, np.int64), cols])
        self.out.append(rows)

    def fallback(self, rows: np.ndarray, prefix: list[int], cols: np.ndarray) -> None:
        """Small group: one column order by total score, rows sorted by it."""
        uniq, _, _, score = _local_counts(self.t, rows, cols)
        per_col = np.zeros(self.t.shape[1], dtype=np.int64)
        np.add.at(per_col, self.t.column[uniq], score)
        cols = cols[np.argsort(-per_col[cols], kind="stable")]
        sub = self.t.codes[np.ix_(rows, cols)]
        self.finish(rows[np.lexsort(sub.T[::-1])], prefix, cols)

    def node(self, rows: np.ndarray, prefix: list[int], cols: np.ndarray) -> None:
        """Pick the best value, recurse on its rows without its column, repeat on the rest."""
        if len(rows) <= self.row_stop or len(cols) <= self.col_stop:
            self.fallback(rows, prefix, cols)
            return
        uniq, inv, cnt, score = _local_counts(self.t, rows, cols)
        k = len(cols)
        by_value = np.argsort(inv.ravel(), kind="stable") // k  # local rows grouped by value
        starts = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        ends = starts + cnt
        length2 = self.t.lengths[uniq] ** 2
        cnt = cnt.copy()
        alive = np.ones(len(rows), dtype=bool)
        cand = np.flatnonzero(score > 0)
        heap = list(zip((-score[cand]).tolist(), cand.tolist(), strict=True))
        heapq.heapify(heap)
        while heap:
            neg, u = heapq.heappop(heap)
            cur = int(length2[u] * (cnt[u] - 1))
            if cur <= 0:
                continue
            if cur != -neg:  # stale: the value lost rows to earlier picks
                heapq.heappush(heap, (-cur, u))
                continue
            members = by_value[starts[u] : ends[u]]
            group = members[alive[members]]
            alive[group] = False
            np.subtract.at(cnt, inv[group].ravel(), 1)
            c = int(self.t.column[uniq[u]])
            self.node(rows[group], [*prefix, c], cols[cols != c])
        if alive.any():  # nothing left is shared: declared order
            self.finish(rows[alive], prefix, cols)


def _ggr(table: FieldTable, *, row_stop: int, col_stop: int) -> tuple[np.ndarray, np.ndarray]:
    run = _GGR(table, row_stop, col_stop)
    n, m = table.shape
    run.node(np.arange(n, dtype=np.int64), [], np.arange(m, dtype=np.int64))
    return run.order, np.concatenate(run.out)


def _level(table: FieldTable, rounds: int = 2) -> np.ndarray:
    """Level-synchronous greedy: at position d every undecided row takes its best (column, value).

    Counts are taken within the row's segment (rows agreeing on every field placed so far). A row's
    first choice counts rows that will pick something else; ``rounds`` passes re-score each option by
    the rows that actually chose it (plus this row), which is what GGR's sequential picks see.
    """
    n, m = table.shape
    codes, n_values = table.codes, len(table.lengths)
    length2 = table.lengths**2
    order = np.empty((n, m), dtype=np.int64)
    used = np.zeros((n, m), dtype=bool)
    seg = np.zeros(n, dtype=np.int64)
    active = np.arange(n, dtype=np.int64)
    for d in range(m):
        if active.size == 0:
            break
        g = codes[active]
        free = ~used[active]
        l2 = length2[g]
        _, inv, cnt = np.unique(
            (seg[active, None] * n_values + g)[free], return_inverse=True, return_counts=True
        )
        key = np.zeros(g.shape, dtype=np.int64)
        key[free] = inv
        score = np.where(free, l2 * (cnt[key] - 1), -1)
        best = np.argmax(score, axis=1)
        at = np.arange(len(active))
        for _ in range(rounds):
            mine = key[at, best]
            claims = np.bincount(mine[score[at, best] > 0], minlength=len(cnt))
            would = claims[key] + 1  # rows holding the value that chose it, counting this row once
            would[at, best] -= score[at, best] > 0
            score = np.where(free, l2 * (np.minimum(would, cnt[key]) - 1), -1)
            best = np.argmax(score, axis=1)
        go = score[at, best] > 0
        stop, active, best = active[~go], active[go], best[go]
        if stop.size:  # nothing shared any more: the unused columns in declared order
            order[stop, d:] = np.argsort(used[stop], axis=1, kind="stable")[:, : m - d]
        if active.size:
            order[active, d] = best
            used[active, best] = True
            _, seg[active] = np.unique(seg[active] * n_values + codes[active, best], return_inverse=True)
    return order
