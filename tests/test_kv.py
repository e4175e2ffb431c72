"""BlockPool: ref counts, pins, free list and peak usage."""

from __future__ import annotations

import random

import pytest

from batchllm.engine.kv import BlockPool


def test_allocate_release_round_trip() -> None:
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a) | set(b)) == 8 and pool.num_free == 0 and pool.peak_used == 8
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.release(a)
    assert pool.num_free == 3 and pool.num_used == 5
    pool.release(b)
    assert pool.num_free == 8 and pool.peak_used == 8
    pool.check_integrity()


def test_shared_block_is_freed_by_its_last_reference() -> None:
    pool = BlockPool(4, 16)
    (blk,) = pool.allocate(1)
    pool.incref([blk])
    pool.incref([blk])
    pool.release([blk])
    pool.release([blk])
    assert pool.num_free == 3 and pool.ref_counts[blk] == 1
    pool.release([blk])
    assert pool.num_free == 4 and pool.ref_counts[blk] == 0
    pool.check_integrity()


def test_pinned_block_is_never_reused() -> None:
    pool = BlockPool(2, 4)
    prefix = pool.allocate(1)
    pool.pin(prefix)
    pool.incref(prefix)  # a member shares it
    pool.release(prefix)  # the member finishes
    other = pool.allocate(1)
    assert other != prefix and pool.num_free == 0
    with pytest.raises(AssertionError, match="pinned"):
        pool.release(prefix)  # the last reference may not go while pinned
    pool.ref_counts[prefix[0]] = 1  # undo the failed release for the rest of the test
    pool.unpin(prefix)
    pool.release(prefix)
    assert pool.allocate(1) == prefix
    pool.check_integrity()


def test_misuse_is_caught() -> None:
    pool = BlockPool(3, 4)
    with pytest.raises(AssertionError):
        pool.release([0])  # free block
    with pytest.raises(AssertionError):
        pool.pin([1])  # free block
    with pytest.raises(AssertionError):
        pool.incref([2])  # free block
    blk = pool.allocate(1)
    with pytest.raises(AssertionError):
        pool.unpin(blk)
    pool.release([])
    pool.check_integrity()


def test_integrity_detects_corruption() -> None:
    pool = BlockPool(4, 4)
    blk = pool.allocate(2)
    pool.free.append(blk[0])  # a used block on the free list
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_random_operations_keep_pool_consistent() -> None:
    rng = random.Random(0)
    pool = BlockPool(32, 8)
    owned: list[list[int]] = []
    pinned: list[list[int]] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.4 and pool.num_free:
            owned.append(pool.allocate(rng.randint(1, pool.num_free)))
        elif op < 0.55 and owned:
            blocks = rng.choice(owned)
            pool.incref(blocks)
            owned.append(list(blocks))
        elif op < 0.65 and owned:
            blocks = rng.choice(owned)
            pool.pin(blocks)
            pool.incref(blocks)  # the pinner holds its own reference
            pinned.append(blocks)
        elif op < 0.75 and pinned:
            blocks = pinned.pop(rng.randrange(len(pinned)))
            pool.unpin(blocks)
            pool.release(blocks)
        elif owned:
            pool.release(owned.pop(rng.randrange(len(owned))))
        pool.check_integrity()
        held = {b for blocks in owned + pinned for b in blocks}
        assert pool.num_used == len(held)
    for blocks in pinned:
        pool.unpin(blocks)
        pool.release(blocks)
    for blocks in owned:
        pool.release(blocks)
    assert pool.num_free == 32 and not any(pool.ref_counts) and not any(pool.pin_counts)
