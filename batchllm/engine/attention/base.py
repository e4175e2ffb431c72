"""The attention-backend seam: one object owns the KV layout, its per-step metadata and the kernels.

The runner describes a scheduled batch once, on the host, as a ``BatchLayout``
(numpy arrays: no Python spans looped over per layer). A backend turns it into
its own typed metadata in ``prepare``; every layer then calls ``rope_store``
(rotate the new queries and keys, write the keys and values: ``store``) and
``forward`` (attend). Backends that support CUDA
graphs also name static metadata arrays (``graph_fields``), capture over them
(``graph_meta``) and write each step into their host twins before a replay
(``fill_graph_meta``).

Two-level attention is part of the layout: rows of one group (sequences that
share the same pinned prefix blocks) are contiguous; the group's queries read
its prefix KV in one pass and each sequence's own KV in another; the two
partial results merge through their log-sum-exps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchllm.engine.rope import Rope
from batchllm.engine.staging import Field

# a layer's new queries, keys and values [T, heads or kv_heads, head_dim]
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class BatchLayout:
    """One step's batch on the host. B sequences (chunks), T tokens, G groups.

    Sequence i computes tokens at positions kv_lens[i] - q_lens[i] .. kv_lens[i] - 1;
    its keys [start_pos[i], kv_lens[i]) are its own, [0, start_pos[i]) the prefix of its
    group (start_pos is 0 for a plain sequence). Group j covers sequences
    group_seqs[j]:group_seqs[j+1] and token rows cu_seqlens_q[group_seqs[j]] ...
    """

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    q_lens: np.ndarray  # [B] int32
    kv_lens: np.ndarray  # [B] int32
    start_pos: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, W] int32, -1 past the end
    group_seqs: np.ndarray  # [G + 1] int32, sequence boundaries of the groups
    group_prefix_lens: np.ndarray  # [G] int32
    group_block_tables: np.ndarray  # [G, Wp] int32
    # prefill-only tree sequences (packed items, label nodes); None in steps without one:
    tree_seqs: np.ndarray | None = None  # [B] bool
    key_ends: np.ndarray | None = None  # [sum(kv_lens)] int32: key k is seen by queries k <= q < key_ends[k]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.q_lens.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_prefix_lens.shape[0])

    @property
    def cu_seqlens_q(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.q_lens)]).astype(np.int32)

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one token (the case CUDA graphs replay)."""
        return bool(self.num_seqs) and int(self.q_lens.max()) == 1 and self.tree_seqs is None


@dataclass(frozen=True)
class KVShape:
    """What a backend needs to size its KV pool."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


class AttentionBackend(ABC):
    """Owns the paged KV cache of every layer and computes attention over it.

    The pool has one block more than the scheduler hands out: ``scratch_block``,
    where padding rows of a CUDA-graph batch write and read.
    """

    name: str = ""
    supports_graphs: bool = False
    supports_tree_mask: bool = False  # reads BatchLayout.key_ends (prefill-only packing, multi-token labels)
    packs_by_default: bool = False  # scoring packs a group's members (tree mask) unless told otherwise

    def __init__(self, shape: KVShape, storage: torch.Tensor | None = None) -> None:
        """storage: a flat tensor of the pool's dtype to lay the KV cache over instead of a new
        allocation (hybrid prefill borrows the idle main pool's memory)."""
        self.shape = shape
        self.scratch_block = shape.num_blocks
        size = self.kv_cache_shape()
        if storage is None:
            self.kv_cache = torch.zeros(size, dtype=shape.dtype, device=shape.device)
        else:
            assert storage.dtype == shape.dtype and storage.device == shape.device and storage.is_contiguous()
            assert storage.numel() >= math.prod(size), "storage smaller than the KV cache"
            self.kv_cache = storage[: math.prod(size)].view(size)

    def kv_cache_shape(self) -> tuple[int, ...]:
        """[k|v, layer, block, kv_head, offset, head_dim]: head-major inside a block (the project's layout)."""
        s = self.shape
        return (2, s.num_layers, s.num_blocks + 1, s.num_kv_heads, s.block_size, s.head_dim)

    @abstractmethod
    def prepare(self, layout: BatchLayout) -> Any:
        """Device metadata for one forward, shared by every layer."""

    @abstractmethod
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: Any) -> None:
        """Write the step's new keys/values [T, kv_heads, head_dim] into their slots."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, meta: Any, scale: float) -> torch.Tensor:
        """Attention output [T, heads, head_dim] for queries q [T, heads, head_dim]."""

    def store_slots(self, meta: Any) -> torch.Tensor | None:
        """Each new token's slot where ``store`` is a plain paged store into ``kv_cache`` (slot -1
        skips): RoPE and the store then run as one kernel (``rope_store``). None: stored otherwise."""
        return None

    def rope_store(self, layer: int, rope: Rope, qkv: QKV, meta: Any, fresh_q: bool) -> torch.Tensor:
        """RoPE on a layer's queries and keys, then ``store``; returns the rotated queries (fresh_q: in a
        new tensor). Where RoPE is fused and the backend has ``store_slots``, the three are one kernel:
        one launch per layer instead of three (of the ~13 a decode step ran per layer)."""
        q, k, v = qkv
        slots = self.store_slots(meta) if rope.fused else None
        if slots is None:
            q, k = rope(q, fresh=fresh_q), rope(k)
            self.store(layer, k, v, meta)
            return q
        return rope.rotate_store(q, k, v, (self.kv_cache[0, layer], self.kv_cache[1, layer]), slots, fresh_q)

    # ---- CUDA-graph hooks (backends with supports_graphs) ---------------------------------

    def graph_fields(self, num_seqs: int, max_groups: int, width: int) -> dict[str, Field]:
        """The static arrays of a decode graph of num_seqs rows, max_groups group slots and block tables
        ``width`` columns wide (``staging``: one device buffer, refilled by one copy per step)."""
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")

    def graph_meta(self, arrays: dict[str, torch.Tensor]) -> Any:
        """The metadata a graph is captured with, over the device arrays of ``graph_fields``."""
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")

    def fill_graph_meta(self, arrays: dict[str, np.ndarray], layout: BatchLayout) -> None:
        """Write a decode layout into the host arrays of ``graph_fields``; rows past its sequences pad."""
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")


def fa3_missing(device: torch.device) -> str | None:
    """What keeps vLLM's bundled FlashAttention-3 off this CUDA device, or None where it runs (the fa3
    backend's refusal and ``auto``'s choice read this one check)."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "needs a Hopper GPU (FlashAttention-3)"
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # not installed, or no FA3 build for this GPU
        return f"needs vLLM's bundled FlashAttention-3 ({e})"
    return None


def require_cuda_half(name: str, shape: KVShape) -> None:
    """Backends of library kernels without CPU or float32 paths: a clear error before any pool is made."""
    if shape.device.type != "cuda":
        raise ValueError(f"attention: backend {name!r} runs on CUDA only, not {shape.device.type!r}")
    if shape.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"attention: backend {name!r} needs bfloat16 or float16, got {shape.dtype}")


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device; pinned and non-blocking on CUDA, so the host never waits for the GPU
    here (only sampled ids and final results sync). A copy from pageable memory would wait for the
    stream's earlier work and end the overlap of host and GPU."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
