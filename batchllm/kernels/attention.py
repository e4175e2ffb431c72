"""Paged attention with two-level (shared-prefix) attention: the torch reference.

Layout of one forward (the same for every implementation in this package):

- q [num_tokens, num_heads, head_dim] holds the new tokens of B sequences back
  to back; sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1], which sit at
  positions kv_lens[i] - q_len_i .. kv_lens[i] - 1.
- k_cache, v_cache [num_blocks, num_kv_heads, block_size, head_dim] (head
  major inside a block, so one head's keys of a block are contiguous): the
  keys and values of positions [0, kv_lens[i]) of sequence i live in blocks
  block_tables[i, :]; new keys are written first through slot_mapping
  (slot = block_id * block_size + offset).
- Two-level attention: a group is a contiguous run of sequences whose first
  prefix_len positions are the same physical blocks (the group's pinned
  prefix). Their queries attend to that prefix in one pass per group (the
  prefix KV is read once, not once per member) and to their own positions
  [prefix_len, kv_len) separately; the two partial results are merged through
  their log-sum-exps. Sequences outside groups take the plain path.

Every query may see all positions up to its own (causal). Tree sequences
(multi-item packing, whole-label scoring) narrow that: with ``key_ends`` (per
sequence, per own key position, concatenated over the batch) key k is seen by
query q only when k <= q < key_ends[k]; stored depth first, that is "the shared
prefix, then my own branch only". The group's shared prefix is seen by all.
``torch_attention(q, k_cache, v_cache, meta, scale) -> out [num_tokens, num_heads, head_dim]``
is the reference every faster kernel is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GroupSpan:
    """Sequences [seq_start, seq_end) of the batch share their first prefix_len positions."""

    seq_start: int
    seq_end: int
    prefix_len: int


@dataclass
class AttentionMeta:
    """Batch layout shared by all layers of one forward (see the module docstring)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    kv_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, unused entries -1
    groups: tuple[GroupSpan, ...] = ()
    # host copies, filled by the builder (metadata is built on the host anyway)
    q_lens_host: list[int] = field(default_factory=list)
    kv_lens_host: list[int] = field(default_factory=list)
    # tree sequences: which ones (None: none), and the key ends [sum(kv_lens)] int32 of every sequence
    tree_host: list[bool] | None = None
    key_ends_host: np.ndarray | None = None
    # block indices and masks of the reference, built once per forward (``plan_reference``)
    plan: RefPlan | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.kv_lens.shape[0]

    def prefix_lens_host(self) -> list[int]:
        lens = [0] * self.num_seqs
        for g in self.groups:
            for i in range(g.seq_start, g.seq_end):
                lens[i] = g.prefix_len
        return lens


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write new keys/values [num_tokens, num_kv_heads, head_dim] into their cache slots."""
    num_kv_heads, block_size, head_dim = k_cache.shape[1:]
    assert k.shape == v.shape and k.shape[0] == slot_mapping.shape[0]
    assert k_cache.shape == v_cache.shape and k.shape[1:] == (num_kv_heads, head_dim)
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)


def read_kvcache(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Keys or values [len(slots), num_kv_heads, head_dim] at the given slots (for tests and debugging)."""
    block_size = cache.shape[2]
    return cache[slots // block_size, :, slots % block_size]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning (out, lse).

    q [..., kvh, g, n, d]: the g query heads of each kv head; k/v [..., kvh, L, d];
    mask True = visible, broadcastable to [..., kvh, g, n, L].
    """
    *lead, kvh, g, n, d = q.shape
    num_keys = k.shape[-2]
    # the g heads of a kv head share its keys: one [g*n, d] x [d, L] product, no key copies
    scores = torch.matmul(q.reshape(*lead, kvh, g * n, d), k.transpose(-1, -2)).view(
        *lead, kvh, g, n, num_keys
    )
    scores = scores * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see nothing
    p = torch.exp(scores - m)
    s = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p.view(*lead, kvh, g * n, num_keys), v).view(*lead, kvh, g, n, d)
    out = out / s.clamp(min=1e-30)
    lse = (m + torch.log(s)).squeeze(-1)  # -inf where nothing was visible
    return out, lse


def merge_attention(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> torch.Tensor:
    """Combine two attention results over disjoint key sets: o [..., n, d], lse [..., n]."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse1 - m).unsqueeze(-1), torch.exp(lse2 - m).unsqueeze(-1)
    return (o1 * w1 + o2 * w2) / (w1 + w2)


def _block_range(table: torch.Tensor, first: torch.Tensor, width: int) -> torch.Tensor:
    """Block ids table[b, first[b] : first[b] + width] per row (padding past the table reads block 0)."""
    cols = (first[:, None] + torch.arange(width, device=table.device)[None, :]).clamp(max=table.shape[1] - 1)
    return table.gather(1, cols).clamp(min=0)


@dataclass
class RefPlan:
    """What the reference reads per layer: decode rows batched, prefill chunks and groups one by one."""

    decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # token rows, blocks, visible
    prefill: list[tuple[int, int, torch.Tensor, torch.Tensor | None, bool]]  # rows, blocks, mask, needs lse
    groups: list[tuple[int, int, torch.Tensor]]  # token rows, prefix blocks


def plan_reference(meta: AttentionMeta, block_size: int, device: torch.device) -> RefPlan:
    """Block indices and masks for the reference, built once per forward and reused by every layer."""
    if meta.plan is not None:
        return meta.plan
    bs = block_size
    q_lens, kv_lens = meta.q_lens_host, meta.kv_lens_host
    prefix_lens = meta.prefix_lens_host()
    tables = meta.block_tables.to(device=device, dtype=torch.int64)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    tree = meta.tree_host or [False] * len(q_lens)
    decode = [i for i, n in enumerate(q_lens) if n == 1 and not tree[i]]
    plan = RefPlan(decode=None, prefill=[], groups=[])
    if decode:
        # own positions start at the (block aligned) prefix end
        own = [kv_lens[i] - prefix_lens[i] for i in decode]
        width = -(-max(own) // bs)
        first = torch.tensor([prefix_lens[i] // bs for i in decode], device=device)
        blocks = _block_range(tables[torch.tensor(decode, device=device)], first, width)
        visible = torch.arange(width * bs, device=device)[None, :] < torch.tensor(own, device=device)[:, None]
        plan.decode = (torch.tensor([cu[i] for i in decode], device=device), blocks, visible)
    key_off = [0]
    for n in kv_lens:
        key_off.append(key_off[-1] + n)
    for i, n in enumerate(q_lens):
        lo, hi = prefix_lens[i], kv_lens[i]
        if tree[i]:
            assert meta.key_ends_host is not None
            ends = meta.key_ends_host[key_off[i] + lo : key_off[i] + hi]
            plan.prefill += _tree_chunks(tables[i], lo, hi, n, cu[i], ends, bs, device)
        elif n > 1:
            blocks = tables[i, lo // bs : -(-hi // bs)]
            keys = torch.arange(lo, lo + blocks.numel() * bs, device=device)
            mask = keys[None, :] <= torch.arange(hi - n, hi, device=device)[:, None]
            is_full_causal = lo == 0 and hi == n and hi % bs == 0
            plan.prefill.append((cu[i], cu[i + 1], blocks, None if is_full_causal else mask, lo > 0))
    for g in meta.groups:
        blocks = tables[g.seq_start, : g.prefix_len // bs]
        plan.groups.append((cu[g.seq_start], cu[g.seq_end], blocks))
    meta.plan = plan
    return plan


def _tree_chunks(
    table: torch.Tensor,
    lo: int,
    hi: int,
    n: int,
    row0: int,
    ends: np.ndarray,
    bs: int,
    device: torch.device,
) -> list[tuple[int, int, torch.Tensor, torch.Tensor, bool]]:
    """A tree sequence's queries [hi - n, hi) against its own keys [lo, hi), one segment at a time.

    A segment starts at a key no earlier own key's subtree covers (a packed item):
    no query reads keys of an earlier segment, so each is attended alone, with the
    tree mask inside it, instead of one dense mask over the whole pack.
    """
    idx = np.arange(lo, hi)
    covered = np.maximum.accumulate(np.r_[lo, ends[:-1].astype(np.int64)])  # max end of the keys before k
    bounds = [*idx[covered <= idx].tolist(), hi]
    out = []
    for a, b in pairwise(bounds):
        q0 = max(a, hi - n)
        if q0 >= b:
            continue
        first = a // bs * bs
        blocks = table[first // bs : -(-b // bs)]
        keys = torch.arange(first, first + blocks.numel() * bs, device=device)
        key_ends = torch.zeros(keys.numel(), dtype=torch.int64, device=device)
        key_ends[a - first : b - first] = torch.from_numpy(ends[a - lo : b - lo].astype(np.int64)).to(device)
        queries = torch.arange(q0, b, device=device)[:, None]
        mask = (keys[None, :] >= a) & (keys[None, :] <= queries) & (queries < key_ends[None, :])
        rows = row0 + q0 - (hi - n)
        out.append((rows, rows + b - q0, blocks, mask, lo > 0))
    return out


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[kvh, len(blocks) * block_size, d] float32 keys or values of consecutive blocks."""
    x = cache[blocks].float()  # [nb, kvh, bs, d]
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3])


def _decode_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row against its blocks, block by block (no copy of the keys into one run).

    q [B, kvh, g, d], k/v [B, nb, kvh, bs, d], visible [B, nb * bs] -> out [B, kvh, g, d], lse [B, kvh, g].
    """
    num_seqs, nb, kvh, bs, _ = k.shape
    g = q.shape[2]
    scores = torch.matmul(q[:, None], k.transpose(-1, -2))  # [B, nb, kvh, g, bs]
    scores = scores.permute(0, 2, 3, 1, 4).reshape(num_seqs, kvh, g, nb * bs) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], -math.inf)
    m = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - m)
    s = p.sum(dim=-1, keepdim=True)
    p = p.view(num_seqs, kvh, g, nb, bs).permute(0, 3, 1, 2, 4)  # [B, nb, kvh, g, bs]
    out = torch.matmul(p, v).sum(dim=1) / s  # every row sees at least itself
    return out, (m + torch.log(s)).squeeze(-1)


def torch_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta, scale: float
) -> torch.Tensor:
    """Reference paged + two-level attention in plain torch (float32 math)."""
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    plan = plan_reference(meta, block_size, q.device)
    qg = q.float().view(num_tokens, num_kv_heads, group, head_dim)
    out = torch.empty(num_tokens, num_kv_heads, group, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_tokens, num_kv_heads, group, dtype=torch.float32, device=q.device)
    # own positions, decode rows batched
    if plan.decode is not None:
        rows, blocks, visible = plan.decode
        k, v = k_cache[blocks].float(), v_cache[blocks].float()  # [B, nb, kvh, bs, d]
        out[rows], lse[rows] = _decode_attend(qg[rows], k, v, visible, scale)
    # own positions, one prefill chunk at a time: q [kvh, g, n, d], k [kvh, L, d]
    for start, end, blocks, mask, needs_lse in plan.prefill:
        k, v = _gather(k_cache, blocks), _gather(v_cache, blocks)
        if needs_lse:
            o, s = _attend(qg[start:end].permute(1, 2, 0, 3), k, v, mask, scale)
            out[start:end], lse[start:end] = o.permute(2, 0, 1, 3), s.permute(2, 0, 1)
        else:  # a plain sequence needs no log-sum-exp: torch's fused attention is faster
            o = F.scaled_dot_product_attention(
                qg[start:end].permute(1, 2, 0, 3).reshape(1, num_heads, end - start, head_dim),
                k.unsqueeze(0),
                v.unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                scale=scale,
                enable_gqa=True,
            )
            out[start:end] = o[0].view(num_kv_heads, group, end - start, head_dim).permute(2, 0, 1, 3)
    # shared prefix, once per group for all of its members' rows (no mask: every row lies after it)
    for start, end, blocks in plan.groups:
        k, v = _gather(k_cache, blocks), _gather(v_cache, blocks)
        o, s = _attend(qg[start:end].permute(1, 2, 0, 3), k, v, None, scale)
        o, s = o.permute(2, 0, 1, 3), s.permute(2, 0, 1)
        out[start:end] = merge_attention(out[start:end], lse[start:end], o, s)
    return out.view(num_tokens, num_heads, head_dim).to(q.dtype)
