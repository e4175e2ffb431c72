"""BlockPool: the ids of the paged KV cache, with reference counts and pins.

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

from collections import deque
from collections.abc import Iterable


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
        ids = [self.free.popleft() for _ in range(n)]
        for b in ids:
            assert self.ref_counts[b] == 0 and self.pin_counts[b] == 0
            self.ref_counts[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return ids

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
