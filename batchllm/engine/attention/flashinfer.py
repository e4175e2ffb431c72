"""FlashInfer's paged attention: the kernel library DESIGN names, as a backend beside our own kernels.

Our KV layout (per layer [block, kv_head, offset, head_dim]) is FlashInfer's
"HND" paged layout, so its kernels read the pool in place. A step's sequences
split by kind, as FlashInfer's kernels do: decode rows (one query) go to its
batch decode kernel (tensor cores for GQA), prefill chunks to its ragged,
causal batch prefill kernel; both read each sequence's own pages. A step with
groups adds a third, unmasked prefill launch of every group's rows against the
group's prefix pages (read once per group, not once per member) and merges it
in through the log-sum-exps (``merge_state_in_place``): the same two-level
split as the Triton backend, in separate launches instead of one fused. Group
prefixes are whole blocks (``build_layout`` asserts it), so each level starts
on a page boundary.

Which decode steps take the two-level path is FlashInfer's own cost question:
its prefix launch runs prefill tiles of few rows, so it pays only for large
groups with long prefixes (``fi_two_level_pays``); other decode steps read
every member's whole context through the decode kernel (member block tables
start with the prefix blocks, so the result is the same). Prefill steps with
groups always take it (many rows per group: the prefill tiles are full).

Plans are made once per step and shared by every layer. No tree mask (packing
and multi-token labels need ``triton`` or ``torch``) and no CUDA graphs: decode
steps run eagerly. Needs bf16 or fp16 (FlashInfer has no fp32 attention) and
the ``flashinfer-python`` package, whose kernels JIT-compile on first use
(bench/device_flashinfer.sh brings it to a machine without network).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from batchllm.engine.attention.base import (
    AttentionBackend,
    BatchLayout,
    KVShape,
    require_cuda_half,
    to_device,
)
from batchllm.kernels.paged import store_kv

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace per wrapper (split-KV partials)
# Decode steps: FlashInfer two-level (decode kernel over own pages + prefill kernel over prefixes + merge)
# against its plain decode, one layer on an H200 (bench.attention, bench/RESULTS.md 2026-12-03 evening):
# 16 members x 2,000-token prefix 1.45 vs 1.81 ms (pays); 4 members x 512 1.71 vs 0.91 ms (loses).
# The line sits between the two measured points.
FI_TWO_LEVEL_MIN_MEMBERS = 8
FI_TWO_LEVEL_MIN_PREFIX = 1024


def fi_two_level_pays(layout: BatchLayout) -> bool:
    """Whether this step's groups take FlashInfer's two-level path (always for prefill steps)."""
    if not layout.num_groups:
        return False
    if not layout.is_decode:
        return True
    members = np.diff(layout.group_seqs).mean()
    prefix = layout.group_prefix_lens.mean()
    return bool(members >= FI_TWO_LEVEL_MIN_MEMBERS and prefix >= FI_TWO_LEVEL_MIN_PREFIX)


@dataclass
class Launch:
    """One FlashInfer launch of a step: its query rows and its (host, int32) page lists."""

    rows: torch.Tensor | slice  # the step's token rows it computes (a slice when contiguous)
    qo_indptr: torch.Tensor  # [n + 1] rows of each sequence / group, from 0
    kv_indptr: torch.Tensor  # [n + 1] into kv_indices
    kv_indices: torch.Tensor  # pages, sequence by sequence
    last_page_len: torch.Tensor  # [n] 1..block_size


@dataclass
class FlashInferMeta:
    slot_mapping: torch.Tensor  # [T] int64, device
    num_tokens: int
    decode: Launch | None  # own keys of the one-query sequences
    prefill: Launch | None  # own keys of the chunks of several queries
    prefix: Launch | None  # each group's prefix pages; None in steps without groups
    planned: dict[str, Any] = field(default_factory=dict)  # scale and heads of the current plans


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


def _rows(token_rows: np.ndarray, device: torch.device) -> torch.Tensor | slice:
    """Row selector: a slice when the rows are one contiguous run (no gather, no scatter)."""
    if token_rows.size and token_rows[-1] - token_rows[0] + 1 == token_rows.size:
        return slice(int(token_rows[0]), int(token_rows[-1]) + 1)
    return to_device(token_rows.astype(np.int64), device)


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"

    def __init__(self, shape: KVShape, storage: torch.Tensor | None = None) -> None:
        require_cuda_half("flashinfer", shape)
        try:
            import flashinfer
        except ImportError as e:
            raise ValueError(
                "attention: backend 'flashinfer' needs the flashinfer-python package "
                "(pip install flashinfer-python; bench/device_flashinfer.sh on an offline machine)"
            ) from e
        super().__init__(shape, storage)
        self._fi = flashinfer

        def workspace() -> torch.Tensor:
            return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=shape.device)

        self._wrappers = {
            "decode": flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace(), "HND", use_tensor_cores=True
            ),
            "prefill": flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "HND"),
            "prefix": flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "HND"),
        }

    def prepare(self, layout: BatchLayout) -> FlashInferMeta:
        bs, dev = self.shape.block_size, self.shape.device
        cu = layout.cu_seqlens_q
        two_level = fi_two_level_pays(layout)
        start = layout.start_pos if two_level else np.zeros_like(layout.start_pos)
        own_first = start // bs  # block-aligned: members skip their group's prefix pages
        own_keys = layout.kv_lens - start

        def own(seqs: np.ndarray) -> Launch | None:
            if not seqs.size:
                return None
            q_lens = layout.q_lens[seqs]
            starts = np.repeat(cu[seqs] - np.r_[0, np.cumsum(q_lens)[:-1]], q_lens)
            token_rows = starts + np.arange(int(q_lens.sum()))  # each sequence's rows, in order
            kv = pages(layout.block_tables[seqs], own_first[seqs], own_keys[seqs], bs)
            return Launch(_rows(token_rows, dev), _host(np.r_[0, np.cumsum(q_lens)]), *map(_host, kv))

        one = layout.q_lens == 1
        prefix = None
        if two_level:
            g, first = layout.num_groups, int(cu[layout.group_seqs[0]])
            kv = pages(layout.group_block_tables, np.zeros(g, np.int64), layout.group_prefix_lens, bs)
            rows = slice(first, int(cu[-1]))  # groups are the step's last rows, group by group
            prefix = Launch(rows, _host(cu[layout.group_seqs] - first), *map(_host, kv))
        return FlashInferMeta(
            slot_mapping=to_device(layout.slot_mapping, dev),
            num_tokens=layout.num_tokens,
            decode=own(np.flatnonzero(one)),
            prefill=own(np.flatnonzero(~one)),
            prefix=prefix,
        )

    def _plan(self, meta: FlashInferMeta, scale: float, num_heads: int) -> None:
        """Plan this step's launches (once: every layer runs the same plans)."""
        s = self.shape
        heads = (num_heads, s.num_kv_heads, s.head_dim, s.block_size)
        dtypes = {"q_data_type": s.dtype, "kv_data_type": s.dtype, "sm_scale": scale}
        if meta.decode is not None:
            d = meta.decode
            self._wrappers["decode"].plan(d.kv_indptr, d.kv_indices, d.last_page_len, *heads, **dtypes)
        for name, causal in (("prefill", True), ("prefix", False)):
            launch = getattr(meta, name)
            if launch is not None:
                self._wrappers[name].plan(
                    launch.qo_indptr,
                    launch.kv_indptr,
                    launch.kv_indices,
                    launch.last_page_len,
                    *heads,
                    causal=causal,
                    **dtypes,
                )
        meta.planned = {"scale": scale, "heads": num_heads}

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: FlashInferMeta) -> None:
        store_kv(k, v, self.kv_cache[0, layer], self.kv_cache[1, layer], meta.slot_mapping)

    def store_slots(self, meta: FlashInferMeta) -> torch.Tensor:
        return meta.slot_mapping

    def forward(self, layer: int, q: torch.Tensor, meta: FlashInferMeta, scale: float) -> torch.Tensor:
        if meta.planned != {"scale": scale, "heads": q.shape[1]}:
            self._plan(meta, scale, q.shape[1])
        cache = (self.kv_cache[0, layer], self.kv_cache[1, layer])
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if meta.prefix else None
        for name in ("decode", "prefill"):
            launch = getattr(meta, name)
            if launch is None:
                continue
            whole = isinstance(launch.rows, slice) and launch.rows == slice(0, meta.num_tokens)
            res = self._wrappers[name].run(q if whole else q[launch.rows], cache, return_lse=lse is not None)
            o, l_ = res if lse is not None else (res, None)
            if whole:
                out, lse = o, l_
                continue
            out[launch.rows] = o
            if lse is not None:
                lse[launch.rows] = l_
        if meta.prefix is not None:
            r = meta.prefix.rows
            pre_out, pre_lse = self._wrappers["prefix"].run(q[r], cache, return_lse=True)
            self._fi.merge_state_in_place(out[r], lse[r], pre_out, pre_lse)  # views: merged into out
        return out


BACKEND = FlashInferBackend
