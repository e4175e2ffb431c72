"""The torch reference attention against dense causal attention computed per sequence."""

from __future__ import annotations

import math

import pytest
import torch

from batchllm.kernels import AttentionMeta, GroupSpan, read_kvcache, store_kvcache, torch_attention
from batchllm.kernels.attention import merge_attention

BLOCK = 4
KV_HEADS, HEADS, DIM = 2, 6, 8


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
    """q [n, h, d] at positions first_pos.., k/v [L, kvh, d]: causal softmax attention."""
    rep = HEADS // KV_HEADS
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k.double()) / math.sqrt(DIM)
    qpos = torch.arange(first_pos, first_pos + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, -math.inf)
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v.double()).float()


def _case(seed: int, specs: list[tuple[int, int, int]], shared: dict[int, tuple[int, int]]):
    """specs: (kv_len, q_len, group) per sequence; shared: group -> (prefix_len, owner)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 128
    k_cache = torch.zeros(num_blocks, KV_HEADS, BLOCK, DIM)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    prefix_blocks: dict[int, list[int]] = {}
    full_k, full_v, tables, slots, qs = [], [], [], [], []
    for g, (plen, _) in shared.items():
        prefix_blocks[g] = [free.pop() for _ in range(plen // BLOCK)]
        k = torch.randn(plen, KV_HEADS, DIM, generator=gen)
        v = torch.randn(plen, KV_HEADS, DIM, generator=gen)
        idx = torch.tensor([prefix_blocks[g][p // BLOCK] * BLOCK + p % BLOCK for p in range(plen)])
        store_kvcache(k, v, k_cache, v_cache, idx)
    for kv_len, q_len, g in specs:
        plen = shared[g][0] if g >= 0 else 0
        own = [free.pop() for _ in range(-(-kv_len // BLOCK) - plen // BLOCK)]
        table = (prefix_blocks[g] if g >= 0 else []) + own
        tables.append(table)
        k = torch.randn(kv_len, KV_HEADS, DIM, generator=gen)
        v = torch.randn(kv_len, KV_HEADS, DIM, generator=gen)
        if plen:  # the shared part is the group's prefix KV
            pidx = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(plen)])
            k[:plen] = read_kvcache(k_cache, pidx)
            v[:plen] = read_kvcache(v_cache, pidx)
        old = torch.tensor(
            [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(plen, kv_len - q_len)], dtype=torch.int64
        )
        store_kvcache(k[plen : kv_len - q_len], v[plen : kv_len - q_len], k_cache, v_cache, old)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(kv_len - q_len, kv_len)]
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(q_len, HEADS, DIM, generator=gen))
    groups, i = [], 0
    while i < len(specs):
        g = specs[i][2]
        j = i
        while j < len(specs) and specs[j][2] == g:
            j += 1
        if g >= 0:
            groups.append(GroupSpan(i, j, shared[g][0]))
        i = j
    width = max(len(t) for t in tables)
    q_lens = [s[1] for s in specs]
    meta = AttentionMeta(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        cu_seqlens_q=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        kv_lens=torch.tensor([s[0] for s in specs], dtype=torch.int32),
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32),
        groups=tuple(groups),
        q_lens_host=q_lens,
        kv_lens_host=[s[0] for s in specs],
    )
    new_k = torch.cat([k[kv - n :] for k, (kv, n, _) in zip(full_k, specs, strict=True)])
    new_v = torch.cat([v[kv - n :] for v, (kv, n, _) in zip(full_v, specs, strict=True)])
    return k_cache, v_cache, meta, qs, full_k, full_v, new_k, new_v


CASES = {
    "plain-mixed": ([(9, 9, -1), (13, 1, -1), (30, 1, -1), (21, 5, -1), (1, 1, -1)], {}),
    "groups-decode": (
        [(17, 1, 0), (19, 1, 0), (12, 1, 0), (33, 1, 1), (30, 1, 1), (7, 1, -1)],
        {0: (8, 0), 1: (24, 0)},
    ),
    "groups-prefill": ([(14, 6, 0), (9, 1, 0), (40, 8, 1), (26, 1, 1), (5, 5, -1)], {0: (8, 0), 1: (16, 0)}),
    "group-of-one": ([(20, 3, 0)], {0: (12, 0)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_dense(name: str) -> None:
    specs, shared = CASES[name]
    k_cache, v_cache, meta, qs, full_k, full_v, new_k, new_v = _case(7, specs, shared)
    store_kvcache(new_k, new_v, k_cache, v_cache, meta.slot_mapping)
    attention = torch_attention
    out = attention(torch.cat(qs), k_cache, v_cache, meta, 1 / math.sqrt(DIM))
    for i, (kv_len, q_len, _) in enumerate(specs):
        ref = _dense(qs[i], full_k[i], full_v[i], kv_len - q_len)
        rows = out[int(meta.cu_seqlens_q[i]) : int(meta.cu_seqlens_q[i + 1])]
        torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-5)


def test_merge_of_two_halves_is_softmax_of_the_whole() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 11, generator=gen) * 4
    v = torch.randn(11, 3, generator=gen)
    parts = []
    for sl in (slice(0, 4), slice(4, 11)):
        s = scores[:, sl]
        parts += [s.softmax(-1) @ v[sl], s.logsumexp(-1)]
    torch.testing.assert_close(merge_attention(*parts), scores.softmax(-1) @ v)
