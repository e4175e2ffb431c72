"""Host side of the tree (multi-item) mask: where each sequence's key ends start, and its open end.

Tree sequences (prefill-only scoring: packed items after a shared trunk, label
nodes after an item) narrow causal attention: key k is seen by query q only
when k <= q < key_ends[k] (storage positions within the sequence). The kernels
read a sequence's key ends from ``key_ends[offsets[i]:]``; keys before
``open_ends[i]`` (from the sequence's first own key on) are seen by every later
query of the step, so tiles attend them without a mask, as for plain prefill.
"""

from __future__ import annotations

import numpy as np


def tree_bounds(
    key_ends: np.ndarray, kv_lens: np.ndarray, start_pos: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [B] int32, open_ends [B] int32) of one step's key ends [sum(kv_lens)].

    offsets[i]: where sequence i's key ends start (key k at offsets[i] + k).
    open_ends[i]: the first key in [start_pos[i], kv_lens[i]) that some query of
    the step at or after it does not see (key_end < kv_len), else kv_lens[i].
    Keys before start_pos[i] (a group's shared prefix) are attended by prefix
    tiles without a mask: a ValueError when a query of the step would not see one.
    """
    kv = np.asarray(kv_lens, dtype=np.int64)
    ends = np.asarray(key_ends)
    offsets = np.zeros(kv.shape[0], dtype=np.int64)
    np.cumsum(kv[:-1], out=offsets[1:])
    if ends.shape != (int(kv.sum()),):
        raise ValueError(f"key_ends: {ends.shape[0]} entries for sum(kv_lens) = {int(kv.sum())} keys")
    seq = np.repeat(np.arange(kv.shape[0]), kv)
    local = np.arange(ends.shape[0], dtype=np.int64) - offsets[seq]
    closed = np.flatnonzero(ends < kv[seq])  # keys that a query of the step past them does not see
    if start_pos is not None and closed.size:
        start = np.asarray(start_pos, dtype=np.int64)
        hidden = closed[local[closed] < start[seq[closed]]]
        if hidden.size:
            i = int(seq[hidden[0]])
            raise ValueError(
                f"key_ends: sequence {i} hides key {int(local[hidden[0]])} of its group's shared prefix "
                f"[0, {int(start[i])}) from some of its queries; a shared prefix must be seen by every member query"
            )
    open_ends = kv.copy()
    if closed.size:
        seqs, first = np.unique(seq[closed], return_index=True)
        open_ends[seqs] = local[closed[first]]
    return offsets.astype(np.int32), open_ends.astype(np.int32)
