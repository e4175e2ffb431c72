"""The torch reference backend: plain torch, float32 math; the oracle for every faster backend."""

from __future__ import annotations

import torch

from batchllm.engine.attention.base import AttentionBackend, BatchLayout, to_device
from batchllm.kernels import AttentionMeta, GroupSpan, store_kvcache, torch_attention


class TorchBackend(AttentionBackend):
    name = "torch"
    supports_tree_mask = True
    packs_by_default = True

    def prepare(self, layout: BatchLayout) -> AttentionMeta:
        dev = self.shape.device
        bounds, prefix = layout.group_seqs.tolist(), layout.group_prefix_lens.tolist()
        groups = tuple(GroupSpan(bounds[j], bounds[j + 1], prefix[j]) for j in range(layout.num_groups))
        return AttentionMeta(
            slot_mapping=to_device(layout.slot_mapping, dev),
            cu_seqlens_q=to_device(layout.cu_seqlens_q, dev),
            kv_lens=to_device(layout.kv_lens, dev),
            block_tables=to_device(layout.block_tables, dev),
            groups=groups,
            q_lens_host=layout.q_lens.tolist(),
            kv_lens_host=layout.kv_lens.tolist(),
            tree_host=None if layout.tree_seqs is None else layout.tree_seqs.tolist(),
            key_ends_host=layout.key_ends,
        )

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> None:
        store_kvcache(k, v, self.kv_cache[0, layer], self.kv_cache[1, layer], meta.slot_mapping)

    def forward(self, layer: int, q: torch.Tensor, meta: AttentionMeta, scale: float) -> torch.Tensor:
        return torch_attention(q, self.kv_cache[0, layer], self.kv_cache[1, layer], meta, scale)


BACKEND = TorchBackend
