"""ModelRunner: the only code that turns a scheduled batch into tensors and runs the model.

It describes each step once on the host (a ``BatchLayout`` of numpy arrays,
built without per-token Python work), hands it to the attention backend, which
owns the KV cache, and runs the forward: eagerly, or for decode steps on CUDA on
the static buffers and captured graph of the step's key (graphs.py). It never
touches queues or block allocation (the scheduler does) and never decides when
a request ends (the engine does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from itertools import chain
from typing import Any, TypeVar

import numpy as np
import torch

from batchllm.engine.attention import BatchLayout, KVShape, create_backend, to_device
from batchllm.engine.graphs import DecodeGraphs
from batchllm.engine.model import CausalLM
from batchllm.engine.sequence import PENDING, ScheduledChunk

T = TypeVar("T")


def on_device(method: Callable[..., T]) -> Callable[..., T]:
    """Run an engine method (its ``device``) with that GPU current: Triton launches, streams and events
    go to the current device, and one process may hold engines on several GPUs."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> T:
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)

    return run


def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def build_layout(chunks: Seq[ScheduledChunk], block_size: int, trees: bool = False) -> BatchLayout:
    """The host description of one step; grouped chunks must be contiguous per group.

    trees: the step may hold tree sequences (prefill-only scoring); generation never does.
    """
    bs, num = block_size, len(chunks)
    q_lens = np.fromiter((c.num_tokens for c in chunks), np.int32, num)
    starts = np.fromiter((c.start for c in chunks), np.int32, num)
    shared = np.fromiter((c.seq.num_shared_tokens if c.two_level else 0 for c in chunks), np.int32, num)
    kv_lens = starts + q_lens
    num_blocks = (kv_lens + bs - 1) // bs
    # groups: plain chunks first, then each group's chunks as one run
    gid = np.where(shared > 0, np.fromiter((c.seq.group_id or 0 for c in chunks), np.int64, num), -1)
    grouped = np.flatnonzero(gid >= 0)
    firsts = grouped[np.r_[True, gid[grouped[1:]] != gid[grouped[:-1]]]] if grouped.size else grouped
    assert not grouped.size or grouped[0] == num - grouped.size, "plain chunks come before grouped ones"
    assert len(set(gid[firsts].tolist())) == len(firsts), "a group's chunks must be contiguous"
    group_seqs = np.r_[firsts, num].astype(np.int32) if firsts.size else np.zeros(1, np.int32)
    # block tables: each member's own blocks one by one, its group's prefix blocks (the same physical
    # blocks for every member) once per group: a decode step of 1,600 members of 100 groups (125 prefix
    # blocks, 19 own) iterates 30k ints in Python instead of 230k
    skip = shared // bs
    tables = np.full((num, int(num_blocks.max())), -1, dtype=np.int32)
    cols = np.arange(tables.shape[1])[None, :]
    tables[(cols >= skip[:, None]) & (cols < num_blocks[:, None])] = np.fromiter(
        chain.from_iterable(
            c.seq.block_table[s:n] for c, s, n in zip(chunks, skip.tolist(), num_blocks.tolist(), strict=True)
        ),
        np.int32,
        int((num_blocks - skip).sum()),
    )
    members = np.diff(group_seqs) if firsts.size else np.zeros(0, np.int64)
    assert np.array_equal(skip[grouped], np.repeat(skip[firsts], members)), "one prefix length per group"
    for a, b, n in zip(firsts.tolist(), group_seqs[1:].tolist(), skip[firsts].tolist(), strict=True):
        tables[a:b, :n] = chunks[a].seq.block_table[:n]
    total = int(q_lens.sum())
    if total == num:  # decode: one token per chunk, no slices
        ids = np.fromiter((c.seq.token_ids[c.start] for c in chunks), np.int64, total)
    else:
        ids = np.concatenate(
            [c.seq.token_ids[c.start : c.start + c.num_tokens] for c in chunks], dtype=np.int64
        )
    rows = np.repeat(np.arange(num), q_lens)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    positions = (np.arange(total) - cu[rows] + starts[rows]).astype(np.int64)
    slots = tables[rows, positions // bs].astype(np.int64) * bs + positions % bs
    prefix_lens = shared[firsts]
    assert np.all(prefix_lens % bs == 0) and np.all(starts[grouped] >= shared[grouped])
    width = int(prefix_lens.max()) // bs if prefix_lens.size else 0
    tree_seqs, key_ends = _tree_fields(chunks, kv_lens, cu, positions) if trees else (None, None)
    return BatchLayout(
        input_ids=ids,
        positions=positions,
        slot_mapping=slots,
        q_lens=q_lens,
        kv_lens=kv_lens.astype(np.int32),
        start_pos=shared,
        block_tables=tables,
        group_seqs=group_seqs,
        group_prefix_lens=prefix_lens.astype(np.int32),
        group_block_tables=np.ascontiguousarray(tables[firsts, :width]),
        tree_seqs=tree_seqs,
        key_ends=key_ends,
    )


def _tree_fields(
    chunks: Seq[ScheduledChunk], kv_lens: np.ndarray, cu: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Tree sequences of prefill-only scoring (``Sequence.key_ends``): their RoPE positions are
    written into ``positions`` in place (slots were computed from storage positions already);
    returns which sequences are trees and every sequence's key ends (None when none is a tree)."""
    tree = np.fromiter((c.seq.key_ends is not None for c in chunks), bool, len(chunks))
    if not tree.any():
        return None, None
    ends = []
    for i, (c, kv) in enumerate(zip(chunks, kv_lens.tolist(), strict=True)):
        if tree[i]:
            positions[cu[i] : cu[i + 1]] = c.seq.rope_positions[c.start : c.end]
            ends.append(c.seq.key_ends[:kv])
        else:
            ends.append(np.full(kv, np.iinfo(np.int32).max, np.int32))
    return tree, np.concatenate(ends).astype(np.int32)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        attention: str = "auto",
        cuda_graphs: bool = True,
        measured_padding: bool = True,
    ) -> None:
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        cfg = model.cfg
        param = model.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        shape = KVShape(
            cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device
        )
        self.attention = create_backend(attention, shape)
        model.set_attention(self.attention)
        use_graphs = cuda_graphs and self.device.type == "cuda" and self.attention.supports_graphs
        self.graphs = (
            DecodeGraphs(model, self.attention, measured_padding=measured_padding) if use_graphs else None
        )
        self.observers: list[Callable[[BatchLayout], None]] = []  # told of every step (``timeline``)

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.attention.kv_cache

    @torch.inference_mode()
    def forward(
        self, chunks: Seq[ScheduledChunk], rows: np.ndarray | None = None, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run one step (chunks as the scheduler emits them: plain first, then group by group).

        Returns the final hidden state of each chunk's last token [len(chunks), hidden], or with
        ``rows`` (token indices into the step's concatenated chunks) of those tokens [len(rows), hidden]:
        prefill-only scoring reads several positions per chunk. tokens: the device buffer of each
        sequence's newest sampled id, by seq_id; a token id still PENDING on the host (sampled by
        the previous step, not yet read back) is taken from it, so the step launches without waiting.
        """
        layout = build_layout(chunks, self.block_size, trees=rows is not None)
        dev = self.device
        if tokens is None or not (pending := layout.input_ids == PENDING).any():
            return self.run(layout, to_device(layout.input_ids, dev), rows)
        # each token row's sequence (group prefixes, ids < 0, never hold a pending token: row 0)
        seq_ids = np.fromiter((c.seq.seq_id for c in chunks), np.int64, len(chunks))
        owners = tokens[to_device(np.repeat(np.maximum(seq_ids, 0), layout.q_lens), dev)]
        if pending.all():  # a decode step right after another: every id is still on the device
            return self.run(layout, owners, rows)
        input_ids = torch.where(to_device(pending, dev), owners, to_device(layout.input_ids, dev))
        return self.run(layout, input_ids, rows)

    @torch.inference_mode()
    def run(
        self, layout: BatchLayout, input_ids: torch.Tensor, rows: np.ndarray | None = None
    ) -> torch.Tensor:
        """Run a described step on its ids (on the device): ``forward`` without building the layout
        (steady decode updates the previous step's layout in place of rebuilding it)."""
        for observe in self.observers:
            observe(layout)
        if rows is None and self.graphs is not None and layout.is_decode and self.graphs.fits(layout):
            return self.graphs.run(layout, input_ids)
        if layout.tree_seqs is not None and not self.attention.supports_tree_mask:
            raise ValueError(f"attention: backend {self.attention.name!r} has no tree (multi-item) mask")
        meta = self.attention.prepare(layout)
        dev = self.device
        # the rows whose hidden state is read: the last layer projects out only these
        keep = None
        if rows is not None:
            keep = to_device(rows.astype(np.int64), dev)
        elif not layout.is_decode:
            keep = to_device(layout.cu_seqlens_q[1:].astype(np.int64) - 1, dev)
        # pinned, non-blocking copies: the host prepares the next step while this one runs
        return self.model(input_ids, to_device(layout.positions, dev), meta, keep)
