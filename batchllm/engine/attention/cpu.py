"""The CPU backend: paged two-level attention on torch's fused CPU attention kernel, no score matrices.

Every attention here is one call of ATen's flash attention for CPU, which
returns the log-sum-exp with the output, so partial results over disjoint key
sets merge exactly (``merge``). Nothing materialises a score matrix or a
causal mask, and keys are read in place wherever they lie in one run:

- The KV pool is head major over blocks, [k|v, layer, kv_head, block, offset,
  head_dim], so a run of consecutive block ids is one strided view
  [kv_head, run * block_size, head_dim] of the pool: a group's prefix and a
  sequence's cached keys are read without a copy (the block allocator hands
  out consecutive ids, so runs are long).
- A prefill chunk attends to its own new keys causally straight from the
  step's k/v (a square causal block, no mask), to its cached keys [start_pos,
  first new position) without a mask, and its group's rows attend to the
  group's prefix once; the parts merge through their log-sum-exps.
- Decode rows with short own key ranges (group members) are batched into one
  call over their gathered blocks with a [B, 1, 1, keys] length mask; long
  ranges (plain sequences) are read as runs, one call each, with no copy.
- Grouped-query heads: the query heads of a kv head are a batch dimension
  whose keys are an expanded (stride 0) view, so keys are never repeated.
- Tree sequences (prefill-only packing) attend segment by segment with the
  reference's per-segment mask (``plan_reference``'s segmentation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from batchllm.engine.attention.base import AttentionBackend, BatchLayout
from batchllm.kernels.attention import _tree_chunks

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

MAX_RUNS = 4  # a key range in more runs of consecutive blocks is gathered into one copy instead
GATHER_MAX_KEYS = 256  # decode rows whose own keys all fit in this many are batched over a gather


@dataclass(frozen=True)
class KeyRange:
    """Keys [0, num_keys) of a block list: as runs (first block, blocks) read in place, or one gather."""

    num_keys: int
    runs: tuple[tuple[int, int], ...] = ()
    index: torch.Tensor | None = None  # [blocks] int64 when gathered


@dataclass
class PrefillTask:
    """Rows [r0, r1) of one chunk: causal over its new keys, plus its cached keys (no mask)."""

    r0: int
    r1: int
    past: KeyRange | None


@dataclass
class DecodeBatch:
    """Decode rows attending to their own keys: one gathered call with a length mask, or runs per row."""

    rows: torch.Tensor | slice  # token rows, a slice when contiguous
    num_rows: int
    index: torch.Tensor | None = None  # [B * W] block ids (gathered mode)
    mask: torch.Tensor | None = None  # [B, 1, 1, W * block_size] additive
    per_row: list[tuple[int, KeyRange]] = field(default_factory=list)  # (row, keys) in run mode


@dataclass
class TreeTask:
    """Rows [r0, r1) of one segment of a tree sequence: its blocks and additive mask [1, 1, n, keys]."""

    r0: int
    r1: int
    keys: KeyRange
    mask: torch.Tensor


@dataclass
class CpuMeta:
    """One step's plan, built once on the host and read by every layer."""

    slot_mapping: torch.Tensor  # [T] int64
    prefill: list[PrefillTask]
    decode: DecodeBatch | None
    trees: list[TreeTask]
    groups: list[tuple[int, int, KeyRange]]  # token rows and the group's prefix keys
    new_k: torch.Tensor | None = None  # the layer's new keys/values [T, kv_heads, head_dim], set by ``store``
    new_v: torch.Tensor | None = None


def key_range(blocks: np.ndarray, num_keys: int, block_size: int, max_runs: int = MAX_RUNS) -> KeyRange:
    """The first num_keys keys of a block list, as in-place runs when they are few, else one gather."""
    blocks = np.asarray(blocks[: -(-num_keys // block_size)], dtype=np.int64)
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    if len(breaks) + 1 > max_runs:
        return KeyRange(num_keys, index=torch.from_numpy(blocks))
    starts = np.r_[0, breaks]
    ends = np.r_[breaks, len(blocks)]
    return KeyRange(
        num_keys, runs=tuple((int(blocks[a]), int(b - a)) for a, b in zip(starts, ends, strict=True))
    )


def read_keys(cache: torch.Tensor, keys: KeyRange) -> list[torch.Tensor]:
    """Views (or one gathered copy) [kv_heads, n, head_dim] covering the range's keys in order."""
    kvh, _, bs, d = cache.shape
    if keys.index is not None:
        x = cache.index_select(1, keys.index).view(kvh, -1, d)
        return [x[:, : keys.num_keys]]
    out, left = [], keys.num_keys
    for first, n in keys.runs:
        x = cache[:, first : first + n].reshape(kvh, n * bs, d)
        out.append(x[:, : min(left, n * bs)])
        left -= n * bs
    return out


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [g, kvh, n, d], lse [g, kvh, n]) of q [g, kvh, n, d] against k/v [kvh, L, d] (L > 0)."""
    g = q.shape[0]
    assert k.shape[1] > 0, "attention over no keys"  # the kernel divides by the key count
    ke, ve = k[None].expand(g, *k.shape), v[None].expand(g, *v.shape)
    return _flash(q, ke, ve, 0.0, causal, attn_mask=mask, scale=scale)


def merge(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint key sets, o [..., n, d] and lse [..., n], as one."""
    lse = torch.logaddexp(l1, l2)
    w = torch.exp(l1 - lse).unsqueeze(-1)
    return torch.lerp(o2.float(), o1.float(), w), lse


def attend_range(
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, keys: KeyRange, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [g, kvh, n, d] against a key range of the pool, run by run, merged."""
    result = None
    for k, v in zip(read_keys(kc, keys), read_keys(vc, keys), strict=True):
        part = attend(q, k, v, scale)
        result = part if result is None else merge(*result, *part)
    assert result is not None
    return result


class CpuBackend(AttentionBackend):
    name = "cpu"
    supports_tree_mask = True
    packs_by_default = True

    def kv_cache_shape(self) -> tuple[int, ...]:
        """[k|v, layer, kv_head, block, offset, head_dim]: consecutive blocks of a head are one run."""
        s = self.shape
        return (2, s.num_layers, s.num_kv_heads, s.num_blocks + 1, s.block_size, s.head_dim)

    def prepare(self, layout: BatchLayout) -> CpuMeta:
        bs = self.shape.block_size
        cu = layout.cu_seqlens_q.tolist()
        q_lens, kv_lens, starts = layout.q_lens.tolist(), layout.kv_lens.tolist(), layout.start_pos.tolist()
        tables = layout.block_tables
        tree = layout.tree_seqs.tolist() if layout.tree_seqs is not None else [False] * len(q_lens)
        prefill: list[PrefillTask] = []
        trees: list[TreeTask] = []
        decode: list[int] = []
        key_off = np.concatenate([[0], np.cumsum(layout.kv_lens)]) if layout.key_ends is not None else None
        for i, n in enumerate(q_lens):
            lo, hi = starts[i], kv_lens[i]
            if tree[i]:
                assert layout.key_ends is not None and key_off is not None
                ends = layout.key_ends[key_off[i] + lo : key_off[i] + hi]
                trees += self._tree_tasks(tables[i], lo, hi, n, cu[i], ends)
            elif n == 1:
                decode.append(i)
            else:
                past = hi - n - lo
                keys = key_range(tables[i, lo // bs :], past, bs) if past > 0 else None
                prefill.append(PrefillTask(cu[i], cu[i + 1], keys))
        groups = []
        bounds = layout.group_seqs.tolist()
        for j, plen in enumerate(layout.group_prefix_lens.tolist()):
            rows = (cu[bounds[j]], cu[bounds[j + 1]])
            groups.append((*rows, key_range(layout.group_block_tables[j], plen, bs)))
        return CpuMeta(
            slot_mapping=torch.from_numpy(np.ascontiguousarray(layout.slot_mapping, dtype=np.int64)),
            prefill=prefill,
            decode=self._decode_batch(layout, decode) if decode else None,
            trees=trees,
            groups=groups,
        )

    def _decode_batch(self, layout: BatchLayout, seqs: list[int]) -> DecodeBatch:
        bs = self.shape.block_size
        cu = layout.cu_seqlens_q
        idx = np.asarray(seqs)
        rows_np = cu[idx].astype(np.int64)
        contiguous = bool(np.all(np.diff(rows_np) == 1))
        rows = slice(int(rows_np[0]), int(rows_np[-1]) + 1) if contiguous else torch.from_numpy(rows_np)
        lo, hi = layout.start_pos[idx].astype(np.int64), layout.kv_lens[idx].astype(np.int64)
        own = hi - lo
        if int(own.max()) > GATHER_MAX_KEYS:
            per_row = [
                (int(r), key_range(layout.block_tables[i, lo_ // bs :], int(n), bs))
                for r, i, lo_, n in zip(rows_np, seqs, lo, own, strict=True)
            ]
            return DecodeBatch(rows, len(seqs), per_row=per_row)
        width = -(-int(own.max()) // bs)
        table = layout.block_tables
        cols = np.minimum(lo[:, None] // bs + np.arange(width)[None, :], table.shape[1] - 1)
        blocks = table[idx[:, None], cols].astype(np.int64)
        blocks[np.arange(width)[None, :] * bs >= own[:, None]] = self.scratch_block  # past the end
        visible = np.arange(width * bs)[None, :] < own[:, None]
        mask = np.where(visible, 0.0, -np.inf).astype(np.float32)[:, None, None, :]
        return DecodeBatch(
            rows,
            len(seqs),
            index=torch.from_numpy(blocks.reshape(-1)),
            mask=torch.from_numpy(mask).to(self.shape.dtype),
        )

    def _tree_tasks(
        self, table: np.ndarray, lo: int, hi: int, n: int, row0: int, ends: np.ndarray
    ) -> list[TreeTask]:
        """The reference's segments of a tree sequence, each with its blocks and additive mask."""
        bs = self.shape.block_size
        chunks = _tree_chunks(
            torch.from_numpy(table.astype(np.int64)), lo, hi, n, row0, ends, bs, torch.device("cpu")
        )
        tasks = []
        for r0, r1, blocks, mask, _ in chunks:
            blocks_np = blocks.numpy()
            keys = key_range(blocks_np, len(blocks_np) * bs, bs, max_runs=1)  # one call: the mask spans it
            additive = torch.zeros(mask.shape, dtype=self.shape.dtype).masked_fill_(~mask, -torch.inf)
            tasks.append(TreeTask(r0, r1, keys, additive[None, None]))
        return tasks

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: CpuMeta) -> None:
        kvh, _, _, d = self.kv_cache.shape[2:]
        for cache, x in ((self.kv_cache[0, layer], k), (self.kv_cache[1, layer], v)):
            cache.view(kvh, -1, d).index_copy_(1, meta.slot_mapping, x.transpose(0, 1).to(cache.dtype))
        meta.new_k, meta.new_v = k, v

    def forward(self, layer: int, q: torch.Tensor, meta: CpuMeta, scale: float) -> torch.Tensor:
        kc, vc = self.kv_cache[0, layer], self.kv_cache[1, layer]
        num_tokens, num_heads, d = q.shape
        kvh = kc.shape[0]
        g = num_heads // kvh
        q = q.to(kc.dtype)
        out = torch.empty(num_tokens, kvh, g, d, dtype=torch.float32)
        lse = torch.empty(num_tokens, kvh, g, dtype=torch.float32)

        def heads_first(rows: slice) -> torch.Tensor:  # [n, H, d] rows -> [g, kvh, n, d] view
            return q[rows].view(-1, kvh, g, d).permute(2, 1, 0, 3)

        def put(rows: slice, o: torch.Tensor, s: torch.Tensor) -> None:
            out[rows] = o.permute(2, 1, 0, 3)
            lse[rows] = s.permute(2, 1, 0)

        assert meta.new_k is not None and meta.new_v is not None, "store runs before forward"
        for task in meta.prefill:
            rows = slice(task.r0, task.r1)
            qh = heads_first(rows)
            k_new = meta.new_k[rows].to(kc.dtype).transpose(0, 1)
            v_new = meta.new_v[rows].to(kc.dtype).transpose(0, 1)
            o, s = attend(qh, k_new, v_new, scale, causal=True)
            if task.past is not None:
                o, s = merge(o, s, *attend_range(qh, kc, vc, task.past, scale))
            put(rows, o, s)
        for tree in meta.trees:
            rows = slice(tree.r0, tree.r1)
            (k,), (v,) = read_keys(kc, tree.keys), read_keys(vc, tree.keys)
            put(rows, *attend(heads_first(rows), k, v, scale, mask=tree.mask))
        if meta.decode is not None:
            self._decode(q, kc, vc, meta.decode, scale, out, lse)
        for r0, r1, keys in meta.groups:
            rows = slice(r0, r1)
            o, s = attend_range(heads_first(rows), kc, vc, keys, scale)
            o, s = merge(out[rows], lse[rows], o.permute(2, 1, 0, 3), s.permute(2, 1, 0))
            out[rows], lse[rows] = o, s
        return out.view(num_tokens, num_heads, d).to(q.dtype)

    def _decode(
        self,
        q: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        batch: DecodeBatch,
        scale: float,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None:
        """Decode rows against their own keys: one masked call over gathered blocks, or runs per row."""
        kvh, _, _, d = kc.shape
        g = q.shape[1] // kvh
        if batch.index is None:
            for row, keys in batch.per_row:
                o, s = attend_range(q[row].view(1, kvh, g, d).transpose(0, 2), kc, vc, keys, scale)
                out[row], lse[row] = o[:, :, 0].transpose(0, 1), s[:, :, 0].transpose(0, 1)
            return
        n = batch.num_rows
        qd = q[batch.rows].view(n, kvh, g, d)
        k = kc.index_select(1, batch.index).view(kvh, n, -1, d).transpose(0, 1)
        v = vc.index_select(1, batch.index).view(kvh, n, -1, d).transpose(0, 1)
        o, s = _flash(qd, k, v, 0.0, False, attn_mask=batch.mask, scale=scale)
        out[batch.rows], lse[batch.rows] = o.to(out.dtype), s.to(lse.dtype)  # bf16 pools: float32 results


BACKEND = CpuBackend
