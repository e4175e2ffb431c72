"""FlashInfer's paged attention: the kernel library DESIGN names, as a backend beside our own kernels.

Our KV layout (per layer [block, kv_head, offset, head_dim]) is FlashInfer's
"HND" paged layout, so its kernels read the pool in place. Every step takes one
ragged, causal ``BatchPrefillWithPagedKVCacheWrapper`` launch over each
sequence's own pages (prefill chunks and decode rows alike). A step with
groups adds a second, unmasked launch of every group's rows against the
group's prefix pages (read once per group, not once per member) and merges the
two through their log-sum-exps with ``merge_state_in_place``: the same
two-level split as the Triton backend, in two launches instead of one fused.
Group prefixes are whole blocks (``build_layout`` asserts it), so each level
starts on a page boundary.

Plans are made once per step, on the host, and shared by every layer. No tree
mask (packing and multi-token labels need ``triton`` or ``torch``) and no CUDA
graphs: decode steps run eagerly. Needs bf16 or fp16 (FlashInfer has no fp32
attention) and the ``flashinfer-python`` package (its kernels JIT-compile on
first use: bench/device_flashinfer.sh brings it to a machine without network).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.engine.attention.base import AttentionBackend, BatchLayout, KVShape
from batchllm.kernels.paged import store_kv

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace per wrapper (split-KV partials)


@dataclass
class PagedLevel:
    """One level's page lists, host int32 (what ``plan`` takes; it copies them to the device itself)."""

    qo_indptr: torch.Tensor  # [n + 1] query rows of each sequence / group
    kv_indptr: torch.Tensor  # [n + 1] into kv_indices
    kv_indices: torch.Tensor  # pages, sequence by sequence
    last_page_len: torch.Tensor  # [n] 1..block_size


@dataclass
class FlashInferMeta:
    slot_mapping: torch.Tensor  # [T] int64, device
    own: PagedLevel  # every sequence's keys from its start_pos (0 for plain sequences)
    prefix: PagedLevel | None  # each group's prefix pages; None in steps without groups
    group_row0: int  # first token row of the groups (plain rows come first)
    planned_scale: float | None = None


def pages(
    tables: np.ndarray, first_block: np.ndarray, num_keys: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Page lists of keys [first_block * block_size, first_block * block_size + num_keys) of each table
    row: (kv_indptr, kv_indices, last_page_len), vectorized over rows (no per-sequence Python)."""
    counts = (num_keys + block_size - 1) // block_size
    cols = np.arange(tables.shape[1])[None, :]
    take = (cols >= first_block[:, None]) & (cols < (first_block + counts)[:, None])
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = (num_keys - (counts - 1) * block_size).astype(np.int32)
    return indptr, tables[take].astype(np.int32), last


def _host(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"

    def __init__(self, shape: KVShape, storage: torch.Tensor | None = None) -> None:
        if shape.device.type != "cuda":
            raise ValueError(f"attention: backend 'flashinfer' runs on CUDA only, not {shape.device.type!r}")
        if shape.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"attention: backend 'flashinfer' needs bfloat16 or float16, got {shape.dtype}")
        try:
            import flashinfer
        except ImportError as e:
            raise ValueError(
                "attention: backend 'flashinfer' needs the flashinfer-python package "
                "(pip install flashinfer-python; bench/device_flashinfer.sh on an offline machine)"
            ) from e
        super().__init__(shape, storage)
        self._fi = flashinfer

        def wrapper():
            ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=shape.device)
            return flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "HND")

        self._own, self._prefix = wrapper(), wrapper()

    def prepare(self, layout: BatchLayout) -> FlashInferMeta:
        bs = self.shape.block_size
        start_block = layout.start_pos // bs  # block-aligned: members skip their group's prefix pages
        own = pages(layout.block_tables, start_block, layout.kv_lens - layout.start_pos, bs)
        cu = layout.cu_seqlens_q
        prefix, row0 = None, int(cu[-1])
        if layout.num_groups:
            row0 = int(cu[layout.group_seqs[0]])
            g = layout.num_groups
            pre = pages(layout.group_block_tables, np.zeros(g, np.int64), layout.group_prefix_lens, bs)
            prefix = PagedLevel(_host(cu[layout.group_seqs] - row0), *map(_host, pre))
        return FlashInferMeta(
            slot_mapping=torch.from_numpy(layout.slot_mapping).to(self.shape.device, non_blocking=True),
            own=PagedLevel(_host(cu), *map(_host, own)),
            prefix=prefix,
            group_row0=row0,
        )

    def _plan(self, meta: FlashInferMeta, scale: float, num_heads: int) -> None:
        """Plan both levels for this step (once: every layer runs the same plan)."""
        s = self.shape
        for wrapper, level, causal in ((self._own, meta.own, True), (self._prefix, meta.prefix, False)):
            if level is None:
                continue
            wrapper.plan(
                level.qo_indptr,
                level.kv_indptr,
                level.kv_indices,
                level.last_page_len,
                num_heads,
                s.num_kv_heads,
                s.head_dim,
                s.block_size,
                causal=causal,
                sm_scale=scale,
                q_data_type=s.dtype,
                kv_data_type=s.dtype,
            )
        meta.planned_scale = scale

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: FlashInferMeta) -> None:
        store_kv(k, v, self.kv_cache[0, layer], self.kv_cache[1, layer], meta.slot_mapping)

    def forward(self, layer: int, q: torch.Tensor, meta: FlashInferMeta, scale: float) -> torch.Tensor:
        if meta.planned_scale != scale:
            self._plan(meta, scale, q.shape[1])
        cache = (self.kv_cache[0, layer], self.kv_cache[1, layer])
        if meta.prefix is None:
            return self._own.run(q, cache)
        out, lse = self._own.run(q, cache, return_lse=True)
        r0 = meta.group_row0
        pre_out, pre_lse = self._prefix.run(q[r0:], cache, return_lse=True)
        self._fi.merge_state_in_place(out[r0:], lse[r0:], pre_out, pre_lse)
        return out


BACKEND = FlashInferBackend
