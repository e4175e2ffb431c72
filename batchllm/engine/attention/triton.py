"""Our Triton kernels: paged attention and two-level attention, with CUDA-graph hooks.

A step without groups takes one paged-attention launch. A step with groups
takes two-level attention: group tiles (every member's queries against the
group's prefix, read once per group) and per-sequence tiles (own keys), merged
through their log-sum-exps; prefill steps in one fused launch, decode steps as
two launches on two streams (the kernels' heuristics decide). Decode graphs get
static metadata of a padded size whose group arrays have room for a group
capacity (graphs.py); empty group slots exit at once.

A mixed step (decode rows beside prefill chunks) splits its attention in two
launches when it has DECODE_SPLIT_MIN_ROWS decode rows or more: tile sizes
are per launch, and in the prefill launch each decode row would take a whole
prefill tile (128 rows of which 4 work) and each group of decode rows a whole
256-row prefix tile. The prefill launch sees the decode rows with no keys and
their decode-only groups with empty prefixes (cheap programs, results
discarded); a second launch over just those rows (gathered) runs decode tiles
and overwrites them.

Tree sequences (prefill-only scoring: packed items, label nodes) take the
kernels' tree mask: the step's key ends, each sequence's offset into them and
its open end (``tree_bounds``, on the host in ``prepare``). Steps without one,
and every decode graph, run the plain kernel variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from batchllm.engine.attention.base import AttentionBackend, BatchLayout, KVShape, to_device
from batchllm.engine.staging import Field
from batchllm.kernels.paged import paged_attention, store_kv, tree_bounds, two_level_attention


@dataclass
class TritonMeta:
    slot_mapping: torch.Tensor  # [T] int64
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    kv_lens: torch.Tensor  # [B] int32
    start_pos: torch.Tensor  # [B] int32 (the group's prefix length for members)
    block_tables: torch.Tensor  # [B, W] int32
    cu_group_rows: torch.Tensor  # [G + 1] int32, token rows of each group
    group_prefix_lens: torch.Tensor  # [G] int32
    group_block_tables: torch.Tensor  # [G, Wp] int32
    max_q_len: int
    max_kv_len: int
    max_prefix_len: int
    max_group_rows: int
    grouped: bool  # any group in the step: take two-level attention
    workspace: dict = field(default_factory=dict, repr=False)  # the kernels' partial results
    # tree steps only (None otherwise): key ends [sum(kv_lens)], offsets [B] and open ends [B], int32
    tree: dict[str, torch.Tensor] | None = None
    # mixed steps split in two launches: the decode rows (token rows, int64) and their own metadata
    decode: tuple[torch.Tensor, TritonMeta] | None = None


DECODE_SPLIT_MIN_ROWS = 32


def split_decode(layout: BatchLayout) -> tuple[BatchLayout, BatchLayout, np.ndarray] | None:
    """A mixed step as (the layout with its decode rows masked: no own keys, and groups of decode rows
    only with empty prefixes; the decode rows' own layout; their token rows), or None when it does not
    split (no prefill chunk, too few decode rows, tree sequences)."""
    one = layout.q_lens == 1
    if layout.tree_seqs is not None or one.all() or one.sum() < DECODE_SPLIT_MIN_ROWS:
        return None
    seqs = np.flatnonzero(one)
    gs = layout.group_seqs
    group_of = np.searchsorted(gs, np.arange(layout.num_seqs), side="right") - 1  # -1: plain
    group_of[np.arange(layout.num_seqs) >= gs[-1]] = -1
    prefilling = np.add.reduceat(~one, gs[:-1]) if layout.num_groups else np.zeros(0, np.int64)
    decode_only = prefilling == 0  # groups whose rows are all decode rows
    masked = replace(
        layout,
        kv_lens=np.where(one, layout.start_pos, layout.kv_lens).astype(np.int32),
        group_prefix_lens=np.where(decode_only, 0, layout.group_prefix_lens).astype(np.int32),
    )
    sub_groups = group_of[seqs]
    kept, counts = np.unique(sub_groups[sub_groups >= 0], return_counts=True)  # groups keep their order
    first = int((sub_groups < 0).sum())  # plain rows come first, as in the step
    decode = BatchLayout(
        input_ids=layout.input_ids[layout.cu_seqlens_q[seqs]],
        positions=layout.positions[layout.cu_seqlens_q[seqs]],
        slot_mapping=layout.slot_mapping[layout.cu_seqlens_q[seqs]],
        q_lens=layout.q_lens[seqs],
        kv_lens=layout.kv_lens[seqs],
        start_pos=layout.start_pos[seqs],
        block_tables=layout.block_tables[seqs],
        group_seqs=np.r_[first, first + np.cumsum(counts)].astype(np.int32),
        group_prefix_lens=layout.group_prefix_lens[kept],
        group_block_tables=layout.group_block_tables[kept],
    )
    return masked, decode, layout.cu_seqlens_q[seqs].astype(np.int64)


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_graphs = True
    supports_tree_mask = True
    packs_by_default = True

    def __init__(self, shape: KVShape, storage: torch.Tensor | None = None) -> None:
        super().__init__(shape, storage)
        self.workspace: dict = {}  # shared by eager steps; each graph keeps its own

    def prepare(self, layout: BatchLayout) -> TritonMeta:
        split = split_decode(layout)
        if split is None:
            return self._meta(layout)
        masked, decode, rows = split
        meta = self._meta(masked)
        meta.decode = (to_device(rows, self.shape.device), self._meta(decode))
        return meta

    def _meta(self, layout: BatchLayout) -> TritonMeta:
        dev = self.shape.device
        cu = layout.cu_seqlens_q
        cu_rows = cu[layout.group_seqs].astype(np.int32)
        rows = np.diff(cu_rows)
        return TritonMeta(
            slot_mapping=to_device(layout.slot_mapping, dev),
            cu_seqlens_q=to_device(cu, dev),
            kv_lens=to_device(layout.kv_lens, dev),
            start_pos=to_device(layout.start_pos, dev),
            block_tables=to_device(layout.block_tables, dev),
            cu_group_rows=to_device(cu_rows, dev),
            group_prefix_lens=to_device(layout.group_prefix_lens, dev),
            group_block_tables=to_device(layout.group_block_tables, dev),
            max_q_len=int(layout.q_lens.max()),
            max_kv_len=int(layout.kv_lens.max()),
            max_prefix_len=int(layout.group_prefix_lens.max()) if layout.num_groups else 0,
            max_group_rows=int(rows.max()) if rows.size else 0,
            grouped=layout.num_groups > 0,
            workspace=self.workspace,
            tree=self._tree(layout),
        )

    def _tree(self, layout: BatchLayout) -> dict[str, torch.Tensor] | None:
        """The tree-mask arguments of a step that holds a tree sequence (raises if a tree member would
        not see its group's whole shared prefix: prefix tiles take no mask)."""
        if layout.tree_seqs is None or layout.key_ends is None:
            return None
        dev = self.shape.device
        offsets, open_ends = tree_bounds(layout.key_ends, layout.kv_lens, layout.start_pos)
        return {
            "key_ends": to_device(layout.key_ends.astype(np.int32, copy=False), dev),
            "key_offsets": to_device(offsets, dev),
            "open_ends": to_device(open_ends, dev),
        }

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: TritonMeta) -> None:
        store_kv(k, v, self.kv_cache[0, layer], self.kv_cache[1, layer], meta.slot_mapping)

    def store_slots(self, meta: TritonMeta) -> torch.Tensor:
        return meta.slot_mapping

    def forward(self, layer: int, q: torch.Tensor, meta: TritonMeta, scale: float) -> torch.Tensor:
        out = self._attend(layer, q, meta, scale)
        if meta.decode is not None:
            rows, decode = meta.decode
            out[rows] = self._attend(layer, q[rows], decode, scale)
        return out

    def _attend(self, layer: int, q: torch.Tensor, meta: TritonMeta, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache[0, layer], self.kv_cache[1, layer]
        if not meta.grouped:
            out, _ = paged_attention(
                q,
                k_cache,
                v_cache,
                meta.cu_seqlens_q,
                meta.kv_lens,
                meta.block_tables,
                None,
                scale,
                meta.max_q_len,
                max_kv_len=meta.max_kv_len,
                workspace=meta.workspace,
                **(meta.tree or {}),
            )
            return out
        out, _ = two_level_attention(
            q,
            k_cache,
            v_cache,
            meta.cu_seqlens_q,
            meta.kv_lens,
            meta.block_tables,
            meta.start_pos,
            meta.cu_group_rows,
            meta.group_prefix_lens,
            meta.group_block_tables,
            scale,
            meta.max_q_len,
            max_kv_len=meta.max_kv_len,
            max_prefix_len=meta.max_prefix_len,
            max_group_rows=meta.max_group_rows,
            workspace=meta.workspace,
            **(meta.tree or {}),
        )
        return out

    # ---- CUDA graphs -------------------------------------------------------------------

    def graph_fields(self, num_seqs: int, max_groups: int, width: int) -> dict[str, Field]:
        """Block tables last: a step ships only the rows of its sequences (``Staging.ship``)."""
        i32, scratch = torch.int32, self.scratch_block
        return {
            "slot_mapping": Field((num_seqs,), torch.int64, scratch * self.shape.block_size),
            "kv_lens": Field((num_seqs,), i32, 1),
            "start_pos": Field((num_seqs,), i32),
            "cu_group_rows": Field((max_groups + 1,), i32),
            "group_prefix_lens": Field((max_groups,), i32),
            "group_block_tables": Field((max_groups, width), i32, scratch),
            "block_tables": Field((num_seqs, width), i32, scratch),
        }

    def graph_meta(self, arrays: dict[str, torch.Tensor]) -> TritonMeta:
        num_seqs, width = arrays["block_tables"].shape
        dev = self.shape.device
        return TritonMeta(
            **{f.name: arrays[f.name] for f in fields(TritonMeta) if f.name in arrays},
            cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32, device=dev),
            max_q_len=1,
            max_kv_len=width * self.shape.block_size,
            max_prefix_len=width * self.shape.block_size,
            max_group_rows=num_seqs,
            grouped=True,
            workspace={},
        )

    def fill_graph_meta(self, arrays: dict[str, np.ndarray], layout: BatchLayout) -> None:
        n, g = layout.num_seqs, layout.num_groups
        size = arrays["kv_lens"].shape[0]
        assert n <= size and g <= arrays["group_prefix_lens"].shape[0]
        # a step's tables may be wider than the graph's (steady decode widens them by several columns):
        # only the columns its keys reach are read, and the graph's width holds its longest sequence
        width = min(layout.block_tables.shape[1], arrays["block_tables"].shape[1])
        assert int(layout.kv_lens.max()) <= arrays["block_tables"].shape[1] * self.shape.block_size
        pwidth = layout.group_block_tables.shape[1]
        # rows past the step's sequences are padding: one key each, written to the scratch block; the
        # key read is the first of the row's table, a valid block whatever step wrote it last
        arrays["slot_mapping"][:n] = layout.slot_mapping
        arrays["slot_mapping"][n:] = self.scratch_block * self.shape.block_size
        arrays["kv_lens"][:n] = layout.kv_lens
        arrays["kv_lens"][n:] = 1
        arrays["start_pos"][:n] = layout.start_pos
        arrays["start_pos"][n:] = 0
        arrays["block_tables"][:n, :width] = layout.block_tables[:, :width]
        # empty group slots past the step's groups: no rows (their programs exit at once)
        arrays["cu_group_rows"][: g + 1] = layout.group_seqs  # decode: one row per sequence
        arrays["cu_group_rows"][g + 1 :] = layout.group_seqs[-1]
        arrays["group_prefix_lens"][:g] = layout.group_prefix_lens
        arrays["group_prefix_lens"][g:] = 0
        if g and pwidth:
            arrays["group_block_tables"][:g, :pwidth] = layout.group_block_tables


BACKEND = TritonBackend
