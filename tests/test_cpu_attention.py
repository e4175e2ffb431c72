"""The CPU attention backend against the torch reference on random steps.

Steps mix plain prefill chunks (first chunks and continuations after cached
keys), decode rows with short and long own key ranges, groups whose members
read a shared prefix (prefill and decode members together), and tree
sequences (packed items with label nodes). Block tables mix runs of
consecutive blocks and scattered blocks, so both ways of reading keys (in place
by runs, gathered) are exercised. Both backends get the same keys: every slot
of the pool is written through ``store``, whatever the backend's KV layout.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from batchllm.engine.attention import KVShape, create_backend, resolve_name
from batchllm.engine.attention import cpu as cpu_backend
from batchllm.engine.labels import LabelSet
from batchllm.engine.packing import build_unit
from batchllm.engine.runner import build_layout
from batchllm.engine.sequence import ScheduledChunk, Sequence

NUM_BLOCKS = 4000
LABELS = LabelSet.from_token_ids(["a", "b", "c"], [[1, 2, 3], [1, 5], [4]])


def _chunk(seq: Sequence, start: int, num_tokens: int, sample: bool = True) -> ScheduledChunk:
    return ScheduledChunk(seq, start, num_tokens, sample)


def _seq(seq_id: int, tokens: int, blocks: list[int], key_ends: np.ndarray | None = None) -> Sequence:
    s = Sequence(seq_id, seq_id, list(range(tokens)), tokens, 4, block_table=blocks)
    if key_ends is not None:
        s.key_ends, s.rope_positions = key_ends, np.arange(tokens)
    return s


def _tree_tokens(rng: np.random.Generator, trunk: int) -> tuple[int, np.ndarray]:
    items = [(i, np.arange(int(rng.integers(1, 12))) + 100) for i in range(int(rng.integers(1, 5)))]
    unit = build_unit(np.arange(trunk), items, LABELS)
    assert unit.key_ends is not None
    return unit.num_tokens, unit.key_ends


def random_step(seed: int, bs: int, trees: bool = False) -> list[ScheduledChunk]:
    """Plain chunks first, then groups, as the scheduler emits them."""
    rng = np.random.default_rng(seed)
    half = NUM_BLOCKS // 2
    scattered = (half + rng.permutation(half)).tolist()
    cursor = [0, 0]

    def blocks(n: int) -> list[int]:
        """Fresh ids: one run of consecutive ids (the first half of the pool) or scattered ones."""
        if rng.random() < 0.5:
            cursor[0] += n
            return list(range(cursor[0] - n, cursor[0]))
        cursor[1] += n
        return scattered[cursor[1] - n : cursor[1]]

    chunks: list[ScheduledChunk] = []
    sid = 0

    def add(prefix: list[int], shared: int, group: int | None) -> None:
        nonlocal sid
        kinds = ["first", "more", "decode_short", "decode_long"]
        kind = "tree" if trees and rng.random() < 0.6 else str(rng.choice(kinds))
        ends = None
        if kind == "tree":
            total, ends = _tree_tokens(rng, shared + int(rng.integers(1, 20)))
            kv = total - int(rng.integers(0, 4))
            n = int(rng.integers(1, kv - shared + 1))
        elif kind == "first":
            kv = shared + int(rng.integers(2, 60))
            n = kv - shared
        elif kind == "more":
            kv = shared + int(rng.integers(10, 300))
            n = int(rng.integers(2, kv - shared))
        else:
            kv = shared + int(rng.integers(1, 40 if kind == "decode_short" else 400))
            n = 1
        table = prefix + blocks(-(-kv // bs) - len(prefix))
        s = _seq(sid, kv if ends is None else len(ends), table, ends)
        s.group_id, s.num_shared_tokens = group, shared
        chunks.append(_chunk(s, kv - n, n))
        sid += 1

    for _ in range(int(rng.integers(0, 5))):
        add([], 0, None)
    for group in range(int(rng.integers(0, 4))):
        shared = bs * int(rng.integers(1, 70))
        prefix = blocks(shared // bs)
        for _ in range(int(rng.integers(2, 7))):
            add(prefix, shared, group)
    if not chunks:
        add([], 0, None)
    return chunks


def run_backend(
    name: str, chunks: list[ScheduledChunk], bs: int, trees: bool = False, seed: int = 0
) -> torch.Tensor:
    """Seeded keys in every slot of the pool, then one step's store and attention (layer 1 of 2)."""
    num_blocks, kvh, g, d = NUM_BLOCKS, 2, 3, 16
    backend = create_backend(name, KVShape(2, num_blocks, bs, kvh, d, torch.float32, torch.device("cpu")))
    gen = torch.Generator().manual_seed(seed)
    slots = (num_blocks + 1) * bs
    for layer in range(2):
        k, v = torch.randn(2, slots, kvh, d, generator=gen).unbind(0)
        backend.store(layer, k, v, SimpleNamespace(slot_mapping=torch.arange(slots)))
    layout = build_layout(chunks, bs, trees=trees)
    meta = backend.prepare(layout)
    q = torch.randn(layout.num_tokens, kvh * g, d, generator=gen)
    k, v = torch.randn(2, layout.num_tokens, kvh, d, generator=gen).unbind(0)
    backend.store(1, k, v, meta)
    return backend.forward(1, q, meta, d**-0.5)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("bs", [4, 16])
def test_random_steps_match_the_reference(seed: int, bs: int) -> None:
    chunks = random_step(seed, bs)
    torch.testing.assert_close(
        run_backend("cpu", chunks, bs), run_backend("torch", chunks, bs), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("seed", range(8))
def test_tree_steps_match_the_reference(seed: int) -> None:
    chunks = random_step(100 + seed, 4, trees=True)
    torch.testing.assert_close(
        run_backend("cpu", chunks, 4, trees=True),
        run_backend("torch", chunks, 4, trees=True),
        atol=2e-5,
        rtol=1e-4,
    )


def test_long_keys_span_several_kernel_blocks() -> None:
    """Prefixes, cached keys and decode ranges longer than the kernel's 512-key split, fragmented."""
    bs, rng = 16, np.random.default_rng(7)
    ids = rng.permutation(400).tolist()
    prefix = ids[:60]  # 960 tokens, scattered: gathered
    chunks = [_chunk(_seq(0, 1500, ids[60:154]), 700, 800)]  # prefill after 700 cached keys
    for i in range(3):
        s = _seq(1 + i, 960 + 600, [*prefix, *ids[154 + 38 * i : 154 + 38 * (i + 1)]])
        s.group_id, s.num_shared_tokens = 0, 960
        chunks.append(_chunk(s, 960 + 599, 1))  # long own range: decoded by runs
    torch.testing.assert_close(
        run_backend("cpu", chunks, bs), run_backend("torch", chunks, bs), atol=2e-5, rtol=1e-4
    )


def test_key_ranges_are_runs_or_one_gather() -> None:
    r = cpu_backend.key_range(np.array([5, 6, 7, 9, 10, 2]), 22, 4)
    assert r.runs == ((5, 3), (9, 2), (2, 1)) and r.index is None and r.num_keys == 22
    r = cpu_backend.key_range(np.array([5, 6, 7, 9, 10, 2]), 9, 4)  # only the blocks the keys need
    assert r.runs == ((5, 3),)
    assert cpu_backend.key_range(np.array([5, 6, 7, 9]), 16, 4, max_runs=1).index is not None
    r = cpu_backend.key_range(np.array([1, 3, 5, 7, 9]), 20, 4)
    assert r.index is not None and r.index.tolist() == [1, 3, 5, 7, 9] and not r.runs


def test_auto_picks_the_cpu_backend_on_cpu() -> None:
    assert resolve_name("auto", torch.device("cpu")) == "cpu"
    backend = create_backend("auto", KVShape(2, 6, 4, 2, 8, torch.float32, torch.device("cpu")))
    assert backend.name == "cpu" and backend.supports_tree_mask
    assert backend.kv_cache.shape == (2, 2, 2, 7, 4, 8) and backend.scratch_block == 6
