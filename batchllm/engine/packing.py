"""Prefill-only sequences: a shared trunk, then items (packed candidates), each with its label nodes.

A unit is one sequence of a prefill-only run (torch-free). Its tokens are
stored as ``trunk | item_1 nodes_1 | item_2 nodes_2 | ...`` where the trunk is
the group's shared prefix, an item is one request's tokens after it, and
nodes are the label-trie positions that score multi-token labels
(``labels.LabelSet``). The attention mask is a tree: every position sees the
trunk, its own item up to itself and, for a node, its ancestor nodes; never
another item. Stored depth first, key k is visible to query q exactly when
``k <= q < key_ends[k]`` (``key_ends[k]`` is the end of k's subtree). RoPE
positions continue from the trunk for every item (``rope``), so each item is
computed as if it followed the prefix alone: packed scores equal per-item
scores.

Multi-item packing (DESIGN 4.3): the members of a group go into units of at
most ``pack_tokens`` item tokens, one sequence per unit instead of one per
member. Unlike packing schemes that give up the prefix cache and chunking,
the trunk stays the group's pinned prefix and units are chunked like any
prompt. A unit with one item and no nodes is a plain prompt (no mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from batchllm.engine.admission import shared_prefix_len
from batchllm.engine.labels import LabelSet
from batchllm.engine.requests import Batch

NO_END = np.iinfo(np.int32).max  # a key every later query sees (trunk, plain prompts)


@dataclass
class Unit:
    """One prefill-only sequence: its tokens, mask and positions, and where its scores are read."""

    token_ids: np.ndarray  # [L] storage order
    rope: np.ndarray | None  # [L] RoPE positions; None: the storage index
    key_ends: np.ndarray | None  # [L] int32; None: plain causal
    requests: list[int]  # request index of each item
    reads: np.ndarray  # [R] storage positions whose final hidden state is read, ascending
    read_item: np.ndarray  # [R] item of each read (index into ``requests``)
    read_reader: np.ndarray  # [R] 0 = the item's last token, k = label node k - 1
    num_label_tokens: int  # node positions (computed, but not prompt tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def is_tree(self) -> bool:
        return self.key_ends is not None


def build_unit(trunk: np.ndarray, items: Sequence[tuple[int, np.ndarray]], labels: LabelSet) -> Unit:
    """A unit from a trunk and (request index, tokens after the trunk) items, each followed by its nodes."""
    assert items and all(t.size > 0 for _, t in items), "every item has a token of its own"
    n_nodes, shared = labels.num_nodes, int(trunk.size)
    parts, ropes, ends = (
        [trunk.astype(np.int64)],
        [np.arange(shared, dtype=np.int64)],
        [np.full(shared, NO_END)],
    )
    reads, read_item, read_reader = [], [], []
    start = shared
    for i, (_, own) in enumerate(items):
        n = int(own.size)
        last = start + n - 1  # storage index of the item's last token
        parts += [own.astype(np.int64), labels.node_tokens]
        ropes += [np.arange(shared, shared + n, dtype=np.int64), shared + n - 1 + labels.node_depth]
        ends += [np.full(n, last + 1 + n_nodes), last + 1 + labels.node_end]
        reads.append(np.arange(last, last + 1 + n_nodes))
        read_item.append(np.full(n_nodes + 1, i))
        read_reader.append(np.arange(n_nodes + 1))
        start = last + 1 + n_nodes
    tree = n_nodes > 0 or len(items) > 1
    return Unit(
        token_ids=np.concatenate(parts),
        rope=np.concatenate(ropes) if tree else None,
        key_ends=np.concatenate(ends).astype(np.int32) if tree else None,
        requests=[k for k, _ in items],
        reads=np.concatenate(reads),
        read_item=np.concatenate(read_item),
        read_reader=np.concatenate(read_reader),
        num_label_tokens=n_nodes * len(items),
    )


def plan_units(
    batch: Batch,
    labels: LabelSet,
    *,
    pack: bool,
    pack_tokens: int,
    block_size: int,
    max_unit_tokens: int | None = None,
    max_hybrid_tokens: int | None = None,
) -> list[tuple[np.ndarray, list[Unit]]]:
    """(shared prefix tokens, units) per group of the batch, in its execution order.

    Requests with an error are left out. With ``pack``, the members of a group
    with a shared prefix fill units of up to ``pack_tokens`` item tokens (label
    nodes included) in plan order, and of up to ``max_unit_tokens`` tokens with
    the prefix (the KV pool: a packed unit must fit where each of its items
    would; items longer than the pool pack among themselves, for hybrid
    prefill, up to ``max_hybrid_tokens`` with the prefix, what it holds); an
    item larger than its budget gets a unit alone.
    """
    out: list[tuple[np.ndarray, list[Unit]]] = []
    for prefix_len, members in batch.groups:
        reqs = [k for k in members if batch.requests[k].error is None]
        if not reqs:
            continue
        lens = [int(batch.requests[k].tokens.size) for k in reqs]
        shared = shared_prefix_len(prefix_len, lens, block_size)
        trunk = batch.requests[reqs[0]].tokens[:shared]
        items = [(k, batch.requests[k].tokens[shared:]) for k in reqs]
        if pack and shared > 0 and len(items) > 1:
            sizes = [int(t.size) + labels.num_nodes for _, t in items]
            room = pack_tokens if max_unit_tokens is None else max_unit_tokens - shared
            # items that fit the pool alone pack as far as it holds them; longer ones (hybrid prefill's
            # anyway) pack among themselves
            over_room = (
                pack_tokens if max_hybrid_tokens is None else min(pack_tokens, max_hybrid_tokens - shared)
            )
            fit = [i for i, size in enumerate(sizes) if size <= room]
            over = [i for i, size in enumerate(sizes) if size > room]
            bins = [
                [part[j] for j in b]
                for part, budget in ((fit, min(pack_tokens, room)), (over, over_room))
                for b in _bins([sizes[i] for i in part], budget)
            ]
        else:
            bins = [[i] for i in range(len(items))]
        out.append((trunk, [build_unit(trunk, [items[i] for i in b], labels) for b in bins]))
    return out


def _bins(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of items whose sizes sum to at most budget (an oversized item runs alone)."""
    bins: list[list[int]] = []
    used = budget
    for i, size in enumerate(sizes):
        if used + size > budget:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += size
    return bins
