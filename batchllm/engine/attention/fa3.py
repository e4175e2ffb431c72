"""vLLM's FlashAttention-3 for prefill, our Triton kernels for decode: the bar our prefill kernels must clear.

vLLM's wheel bundles a compiled Hopper FlashAttention-3 with paged KV
(``vllm.vllm_flash_attn.flash_attn_varlen_func``). Prefill attention is
compute-bound, so a step with prefill chunks runs it plain: every sequence's
queries against its whole block table, causal from the bottom right. A member
then reads its group's prefix pages itself: the same FLOPs as two-level
attention and more bytes, which a compute-bound step hides (FA3 ran 651
TFLOP/s on 2 x 8,192 causal tokens where our tiles run 410, bench/RESULTS.md
2026-12-04). Decode steps (bandwidth-bound: two-level reads each prefix once
per group) and steps with tree sequences (FA3 has no tree mask) run the
Triton backend, whose CUDA graphs this backend keeps; so do a mixed step's
decode rows (FA3 would read each member's prefix for one query).

FA3 reads the pool in place through a [block, offset, kv_head, head_dim] view
of the project's [block, kv_head, offset, head_dim] layout (strides, no copy).
A step whose every sequence starts at position 0 (whole prompts, no cached
prefix: prefill-only jobs without sharing, group prefixes) has nothing to read
from the pool but its own keys: FA3 takes the keys and values the projection
just produced, unpaged, as ``rope_store`` (or ``store``) received them. Paged FA3 gathers its key
tiles page by page; unpaged it streams them (bench.prefill_attention's
``prompts`` case measures both).
Needs CUDA, bf16 or fp16, and vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from batchllm.engine.attention.base import (
    QKV,
    BatchLayout,
    KVShape,
    fa3_missing,
    require_cuda_half,
    to_device,
)
from batchllm.engine.attention.triton import TritonBackend, TritonMeta, split_decode
from batchllm.engine.rope import Rope


@dataclass
class FA3Meta:
    """A prefill step for FA3: the Triton metadata holds the KV store's slots and FA3's arguments (every
    sequence's whole context: kv_lens, block tables with the prefix blocks, -1 past the end unread).
    fresh: no sequence has cached keys; ``rope_store`` (or ``store``) leaves this layer's keys and values
    in ``kv``."""

    triton: TritonMeta
    fresh: bool = False
    kv: tuple[torch.Tensor, torch.Tensor] | None = None


class FA3Backend(TritonBackend):
    name = "fa3"
    # members unpacked run FA3 (tree steps run Triton): 12.95 against 13.46 s on W(8000,150,20,40), 6.40
    # against 6.53 s on W(4000,150,50,20) (H200, bench.score, bench/RESULTS.md 2026-12-04 day)
    packs_by_default = False

    def __init__(self, shape: KVShape, storage: torch.Tensor | None = None) -> None:
        require_cuda_half("fa3", shape)
        if (why := fa3_missing(shape.device)) is not None:
            raise ValueError(f"attention: backend 'fa3' {why}")
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        self._fa = flash_attn_varlen_func
        super().__init__(shape, storage)

    def prepare(self, layout: BatchLayout) -> TritonMeta | FA3Meta:
        if layout.is_decode or layout.tree_seqs is not None:
            return super().prepare(layout)
        split = split_decode(layout)
        if split is None:
            return FA3Meta(self._meta(layout), fresh=bool((layout.kv_lens == layout.q_lens).all()))
        # A mixed step's decode rows would each read their whole context plain (a member its group's
        # prefix): FA3 gives them one key (results discarded) and the two-level decode launch redoes them.
        _, decode, rows = split
        one = layout.q_lens == 1
        meta = self._meta(replace(layout, kv_lens=np.where(one, 1, layout.kv_lens).astype(np.int32)))
        meta.decode = (to_device(rows, self.shape.device), self._meta(decode))
        return FA3Meta(meta)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: TritonMeta | FA3Meta) -> None:
        if isinstance(meta, FA3Meta):
            super().store(layer, k, v, meta.triton)
            meta.kv = (k, v) if meta.fresh else None
        else:
            super().store(layer, k, v, meta)

    def rope_store(
        self, layer: int, rope: Rope, qkv: QKV, meta: TritonMeta | FA3Meta, fresh_q: bool
    ) -> torch.Tensor:
        if not (isinstance(meta, FA3Meta) and rope.fused):
            return super().rope_store(layer, rope, qkv, meta, fresh_q)  # ``store`` keeps fresh keys
        q = super().rope_store(layer, rope, qkv, meta.triton, fresh_q)  # one kernel
        _, k, v = qkv  # k rotated in place
        meta.kv = (k, v) if meta.fresh else None
        return q

    def forward(self, layer: int, q: torch.Tensor, meta: TritonMeta | FA3Meta, scale: float) -> torch.Tensor:
        if not isinstance(meta, FA3Meta):
            return super().forward(layer, q, meta, scale)
        m = meta.triton
        q = q.contiguous()  # a no-op for the model's queries (RoPE writes them fresh)
        if meta.kv is not None:  # this layer's own keys, unpaged: every sequence's keys are its queries' rows
            k, v = meta.kv
            meta.kv = None
            out = self._fa(
                q, k, v, max_seqlen_q=m.max_q_len, cu_seqlens_q=m.cu_seqlens_q, max_seqlen_k=m.max_q_len,
                cu_seqlens_k=m.cu_seqlens_q, softmax_scale=scale, causal=True, fa_version=3,
            )  # fmt: skip
        else:
            # [block, kv_head, offset, dim] -> a [block, offset, kv_head, dim] view, as FA3's paged KV reads it
            k = self.kv_cache[0, layer].transpose(1, 2)
            v = self.kv_cache[1, layer].transpose(1, 2)
            out = self._fa(
                q, k, v, max_seqlen_q=m.max_q_len, cu_seqlens_q=m.cu_seqlens_q, max_seqlen_k=m.max_kv_len,
                seqused_k=m.kv_lens, block_table=m.block_tables, softmax_scale=scale, causal=True, fa_version=3,
            )  # fmt: skip
        if m.decode is not None:
            rows, decode = m.decode
            out[rows] = self._attend(layer, q[rows], decode, scale)
        return out


BACKEND = FA3Backend
