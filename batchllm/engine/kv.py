"""BlockPool: the ids of the paged KV cache, with reference counts and pins; and how many blocks fit.

The engine owns the KV tensors and indexes them by these block ids; the pool
only decides which ids are free. The scheduler is its only caller.

Contract:
- ``allocate(n)`` returns n distinct free ids, each with ref count 1.
- ``incref``/``release`` share and drop references; a block goes back to the
  free list when its last reference is dropped and it is not pinned.
- ``pin`` guarantees a block is neither freed nor reused until ``unpin``:
  dropping the last reference of a pinned block is an error (the group
  prefix must outlive its members), so a pin can never silently leak.
- Releasing or unpinning nothing is safe; ``check_integrity`` verifies the
  free list, ref counts and pins agree (tests call it after every step).
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Iterable
from typing import Any

_GIB = 1 << 30


class BlockPool:
    """Free list plus per-block ref counts and pin counts over ids [0, num_blocks)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.pin_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens positions."""
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"KV pool: {n} blocks requested, {len(self.free)} free")
        return [self.allocate_one() for _ in range(n)]

    def allocate_one(self) -> int:
        """One block (a decode step opens one per sequence at most: no list on its hot path)."""
        if not self.free:
            raise MemoryError("KV pool: 1 block requested, 0 free")
        b = self.free.popleft()
        assert self.ref_counts[b] == 0 and self.pin_counts[b] == 0
        self.ref_counts[b] = 1
        self.peak_used = max(self.peak_used, self.num_blocks - len(self.free))
        return b

    def incref(self, ids: Iterable[int]) -> None:
        for b in ids:
            assert self.ref_counts[b] > 0, f"block {b}: sharing a free block"
            self.ref_counts[b] += 1

    def release(self, ids: Iterable[int]) -> None:
        for b in ids:
            assert self.ref_counts[b] > 0, f"block {b}: released more often than referenced"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                assert self.pin_counts[b] == 0, f"block {b}: last reference dropped while pinned"
                self.free.append(b)

    def pin(self, ids: Iterable[int]) -> None:
        for b in ids:
            assert self.ref_counts[b] > 0, f"block {b}: pinning a free block"
            self.pin_counts[b] += 1

    def unpin(self, ids: Iterable[int]) -> None:
        for b in ids:
            assert self.pin_counts[b] > 0, f"block {b}: unpinned more often than pinned"
            self.pin_counts[b] -= 1

    def is_pinned(self, block_id: int) -> bool:
        return self.pin_counts[block_id] > 0

    def check_integrity(self) -> None:
        free = set(self.free)
        assert len(free) == len(self.free), "free list holds a block twice"
        for b in range(self.num_blocks):
            assert self.ref_counts[b] >= 0 and self.pin_counts[b] >= 0
            in_use = self.ref_counts[b] > 0
            assert in_use != (b in free), f"block {b}: ref count {self.ref_counts[b]} vs free list"
            assert self.pin_counts[b] == 0 or in_use, f"block {b}: pinned but free"
        assert self.peak_used >= self.num_used


def pool_blocks(
    bytes_per_block: int,
    block_size: int,
    *,
    kv_cache_tokens: int | None,
    kv_cache_gb: float | None,
    gpu_memory: tuple[int, int] | None,
    gpu_memory_utilization: float,
    activation_margin: int,
) -> int:
    """Blocks of the KV pool: kv_cache_tokens if given, else kv_cache_gb, else on a GPU
    (``gpu_memory`` = (free, total) bytes after loading the weights) utilization x total
    minus the memory in use and an activation margin; else 2 GB (CPU).

    A ValueError names the option that leaves no block.
    """
    if kv_cache_tokens is not None:
        return -(-kv_cache_tokens // block_size)
    if kv_cache_gb is None and gpu_memory is not None:
        free, total = gpu_memory
        budget = gpu_memory_utilization * total - (total - free) - activation_margin
        if budget < bytes_per_block:
            raise ValueError(
                f"gpu_memory_utilization: {gpu_memory_utilization} of {total / _GIB:.1f} GiB leaves no room "
                f"for the KV cache ({(total - free) / _GIB:.1f} GiB in use after loading the weights, "
                f"{activation_margin / _GIB:.1f} GiB kept for activations); raise it or give "
                "kv_cache_gb or kv_cache_tokens"
            )
        return int(budget) // bytes_per_block
    gb = kv_cache_gb if kv_cache_gb is not None else 2.0
    num_blocks = int(gb * _GIB) // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_gb: {gb} GB holds no KV block")
    return num_blocks


def gpu_memory(device: Any) -> tuple[int, int]:
    """(free, total) bytes of the GPU, after handing back what this process's allocator caches unused
    (an engine freed earlier in the same process must not count as memory in use)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)


def activation_bytes(cfg: Any, num_tokens: int, itemsize: int) -> int:
    """A rough bound on one step's transient memory (``cfg``: a ModelConfig): per token, the
    layer activations (hidden states, q/k/v, the MLP's gate/up/act), the float32 residual stream in
    and out, and 12 bytes per vocabulary entry for the float32 logits and sampling's copies (every
    token sampled: a decode step of that many sequences)."""
    per_token = (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * itemsize + 8 * cfg.hidden_size
    per_token += cfg.vocab_size * 12
    return num_tokens * per_token
