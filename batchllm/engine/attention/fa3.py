"""FlashAttention-3 as bundled in vLLM's wheel: the library bar for our own kernels (CUDA, Hopper).

Its paged KV layout is [block, offset, kv_head, head_dim], so this backend owns
a cache in that layout. Plain sequences take one causal pass over their
blocks; two-level attention takes two passes, each group's queries against its
prefix (no mask) and each sequence's queries against its own blocks (causal,
bottom-right aligned), both returning log-sum-exp, merged by our merge kernel.
Runs eagerly (no CUDA graphs): FA3's grid depends on per-step maxima.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.engine.attention.base import AttentionBackend, BatchLayout, KVShape, to_device
from batchllm.kernels.attention import merge_attention


def _flash_attn():
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise ValueError("attention: 'fa3' needs vLLM installed (its bundled FlashAttention-3)") from e
    return flash_attn_varlen_func


@dataclass
class FA3Meta:
    slot_mapping: torch.Tensor  # [T] int64
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    own_lens: torch.Tensor  # [B] keys from start_pos on
    own_tables: torch.Tensor  # [B, W] block tables from start_pos on
    max_q_len: int
    max_own_len: int
    cu_group_rows: torch.Tensor  # [G + 1] token rows of each group
    group_prefix_lens: torch.Tensor  # [G]
    group_tables: torch.Tensor  # [G, Wp]
    max_group_rows: int
    max_prefix_len: int
    grouped_rows: slice  # token rows that belong to groups (after the plain ones)


class FA3Backend(AttentionBackend):
    name = "fa3"

    def __init__(self, shape: KVShape) -> None:
        super().__init__(shape)
        self.attn = _flash_attn()

    def kv_cache_shape(self) -> tuple[int, ...]:
        s = self.shape
        return (2, s.num_layers, s.num_blocks + 1, s.block_size, s.num_kv_heads, s.head_dim)

    def prepare(self, layout: BatchLayout) -> FA3Meta:
        dev, bs = self.shape.device, self.shape.block_size
        cu = layout.cu_seqlens_q
        first = layout.start_pos // bs  # own keys start on a block boundary
        width = layout.block_tables.shape[1]
        cols = np.minimum(first[:, None] + np.arange(width)[None, :], width - 1)
        own_tables = np.take_along_axis(layout.block_tables, cols, axis=1)
        own_lens = layout.kv_lens - layout.start_pos
        bounds = layout.group_seqs
        cu_rows = cu[bounds]
        rows = cu_rows[1:] - cu_rows[:-1]
        return FA3Meta(
            slot_mapping=to_device(layout.slot_mapping, dev),
            cu_seqlens_q=to_device(cu, dev),
            own_lens=to_device(own_lens.astype(np.int32), dev),
            own_tables=to_device(own_tables.astype(np.int32), dev),
            max_q_len=int(layout.q_lens.max()),
            max_own_len=int(own_lens.max()),
            cu_group_rows=to_device((cu_rows - cu_rows[0]).astype(np.int32), dev),
            group_prefix_lens=to_device(layout.group_prefix_lens, dev),
            group_tables=to_device(layout.group_block_tables, dev),
            max_group_rows=int(rows.max()) if rows.size else 0,
            max_prefix_len=int(layout.group_prefix_lens.max()) if layout.num_groups else 0,
            grouped_rows=slice(int(cu_rows[0]), int(cu_rows[-1])),
        )

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: FA3Meta) -> None:
        s = self.shape
        k_flat = self.kv_cache[0, layer].view(-1, s.num_kv_heads, s.head_dim)
        v_flat = self.kv_cache[1, layer].view(-1, s.num_kv_heads, s.head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k.to(s.dtype))
        v_flat.index_copy_(0, meta.slot_mapping, v.to(s.dtype))

    def forward(self, layer: int, q: torch.Tensor, meta: FA3Meta, scale: float) -> torch.Tensor:
        k, v = self.kv_cache[0, layer], self.kv_cache[1, layer]
        grouped = meta.max_group_rows > 0
        out = self.attn(
            q,
            k,
            v,
            max_seqlen_q=meta.max_q_len,
            cu_seqlens_q=meta.cu_seqlens_q,
            max_seqlen_k=meta.max_own_len,
            seqused_k=meta.own_lens,
            block_table=meta.own_tables,
            softmax_scale=scale,
            causal=True,
            return_softmax_lse=grouped,
            fa_version=3,
        )
        if not grouped:
            return out
        out, lse = out
        rows = meta.grouped_rows
        o2, lse2 = self.attn(
            q[rows],
            k,
            v,
            max_seqlen_q=meta.max_group_rows,
            cu_seqlens_q=meta.cu_group_rows,
            max_seqlen_k=meta.max_prefix_len,
            seqused_k=meta.group_prefix_lens,
            block_table=meta.group_tables,
            softmax_scale=scale,
            causal=False,
            return_softmax_lse=True,
            fa_version=3,
        )
        lse1 = _rows_first(lse, q.shape[1])[rows]
        lse2 = _rows_first(lse2, q.shape[1])
        out[rows] = merge_attention(out[rows].float(), lse1, o2.float(), lse2).to(out.dtype)
        return out


def _rows_first(lse: torch.Tensor, num_heads: int) -> torch.Tensor:
    """FA3 returns lse as [heads, tokens]; the merge wants [tokens, heads]."""
    return lse.transpose(0, 1) if lse.shape[0] == num_heads else lse


BACKEND = FA3Backend
