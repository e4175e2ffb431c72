"""Hybrid prefill (PrefillOnly, DESIGN 4.3): a prefill-only sequence longer than the KV pool holds.

A paged forward keeps every layer's keys and values of the whole sequence,
yet a prefill-only sequence needs them only until its scores are read. Here
the model runs layer by layer over the whole sequence and, inside a layer,
chunk by chunk: chunk c writes its keys and values into a cache of ONE layer
and attends to the chunks before it, which that layer has stored already
(causality), so projections and the MLP never see more than ``chunk_tokens``
rows while attention sees the whole sequence. The next layer overwrites the
cache. What lives for the whole sequence is the hidden state and the residual
stream and one layer's KV: per token 2 x hidden + 2 x kv_heads x head_dim
values, instead of the paged pool's 2 x layers x kv_heads x head_dim.

Its memory is the main KV pool's, borrowed while the pool is idle (after the
paged units of a run), so the same budget holds a longer sequence by the ratio
of the two (``capacity``). The attention is the engine's own backend (a
one-layer instance over the borrowed memory), with the unit's tree mask for
label nodes, so scores match the paged path's to float tolerance (the sums run
in another order).
"""

from __future__ import annotations

import numpy as np
import torch

from batchllm.engine.attention import BatchLayout, KVShape, create_backend, to_device
from batchllm.engine.model import CausalLM
from batchllm.engine.packing import Unit
from batchllm.engine.rope import Rope
from batchllm.engine.runner import build_layout
from batchllm.engine.sequence import ScheduledChunk, Sequence


def plain_len(unit: Unit) -> int:
    """Leading tokens of the unit that form a plain causal sequence (positions = storage index and
    no key hidden from a later query among them); the rest needs the tree mask."""
    n = unit.num_tokens
    if unit.key_ends is None:
        return n
    idx = np.arange(n)
    ok = (np.minimum.accumulate(unit.key_ends.astype(np.int64)) >= idx + 1) & (unit.rope == idx)
    return n if ok.all() else int(np.argmin(ok))


class HybridPrefill:
    """Runs one unit at a time over ``storage`` (a flat tensor of the model's dtype, the idle pool)."""

    def __init__(
        self, model: CausalLM, attention: str, storage: torch.Tensor, block_size: int, chunk_tokens: int
    ) -> None:
        self.model, self.attention, self.block_size = model, attention, block_size
        self.storage = storage.view(-1)
        self.chunk_tokens = chunk_tokens
        cfg = model.cfg
        self.kv_width = cfg.num_kv_heads * cfg.head_dim

    def bytes_needed(self, num_tokens: int) -> int:
        """Borrowed bytes for a sequence: hidden states, residual stream, one layer's KV (block rounded)
        and the attention backend's scratch block."""
        blocks = -(-num_tokens // self.block_size) + 1
        per_kv = 2 * self.block_size * self.kv_width
        item = self.storage.element_size()
        states = num_tokens * self.model.cfg.hidden_size * (item + self._residual_dtype.itemsize)
        return states + blocks * per_kv * item

    @property
    def _residual_dtype(self) -> torch.dtype:
        """The residual stream's dtype (the model says; the storage's dtype by default)."""
        return self.model.residual_dtype or self.storage.dtype

    def capacity(self) -> int:
        """The longest sequence the borrowed memory holds."""
        lo, hi = 0, self.storage.numel()
        have = self.storage.numel() * self.storage.element_size()
        while lo < hi:  # bytes_needed is monotone in the length
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.bytes_needed(mid) <= have else (lo, mid - 1)
        return lo

    @torch.inference_mode()
    def forward(self, unit: Unit) -> torch.Tensor:
        """Final hidden states [len(unit.reads), hidden] at the unit's read positions.

        The borrowed memory is zeroed after: hidden states and residuals left in it would read as KV
        of NaN or inf bit patterns, which a backend that masks whole blocks by adding -inf (cpu)
        turns into NaN scores in the engine's next call."""
        n = unit.num_tokens
        if n > self.capacity():
            raise MemoryError(
                f"{n} tokens need {self.bytes_needed(n)} bytes, the idle KV pool has "
                f"{self.storage.numel() * self.storage.element_size()}"
            )
        try:
            return self._forward(unit)
        finally:
            self.storage[: -(-self.bytes_needed(n) // self.storage.element_size())].zero_()

    def _forward(self, unit: Unit) -> torch.Tensor:
        n, model = unit.num_tokens, self.model
        cfg, bs = model.cfg, self.block_size
        hidden = cfg.hidden_size
        x = self.storage[: n * hidden].view(n, hidden)
        kv_from = n * hidden * (1 + self._residual_dtype.itemsize // self.storage.element_size())
        res = self.storage[n * hidden : kv_from].view(self._residual_dtype).view(n, hidden)
        blocks = -(-n // bs)
        shape = KVShape(1, blocks, bs, cfg.num_kv_heads, cfg.head_dim, x.dtype, x.device)
        backend = create_backend(self.attention, shape, self.storage[kv_from:])
        steps = [(c, backend.prepare(layout), layout) for c, layout in self._chunks(unit, blocks)]
        dev = x.device
        positions = []
        for c, _, layout in steps:
            x[c.start : c.end] = model.embed_tokens(to_device(layout.input_ids, dev))
            positions.append(to_device(layout.positions, dev))
        reads = unit.reads.astype(np.int64)
        if not len(model.layers):
            return model.norm(x[to_device(reads, dev)])
        last = len(model.layers) - 1
        x_read, res_read = x.new_empty(len(reads), hidden), res.new_empty(len(reads), hidden)
        for i, layer in enumerate(model.layers):
            for (c, meta, _), pos in zip(steps, positions, strict=True):
                rope = Rope(model.rope, pos, x.dtype, model.fused)  # per chunk: no cos/sin for all tokens
                xc, rc = x[c.start : c.end], res[c.start : c.end]
                if i < last:
                    out, r = layer(rope, xc, rc if i else None, meta, kv=(backend, 0))
                    rc.copy_(r)  # new tensors: neither aliases the chunk's rows
                    xc.copy_(out)
                    continue
                # the last layer stores every row's keys and values but projects out only the rows read
                sel = np.flatnonzero((reads >= c.start) & (reads < c.end))
                keep = to_device(reads[sel] - c.start, dev)
                out, r = layer(rope, xc, rc if i else None, meta, kv=(backend, 0), keep=keep)
                at = to_device(sel, dev)
                x_read[at], res_read[at] = out, r
        return model.norm(x_read, res_read)[0]

    def _chunks(self, unit: Unit, blocks: int) -> list[tuple[ScheduledChunk, BatchLayout]]:
        """The unit's chunks and their layouts: its plain causal part as a plain sequence, the rest
        (label nodes, packed items) with the tree mask; both over the one-layer cache's blocks 0.."""
        n, size = unit.num_tokens, self.chunk_tokens
        table = list(range(blocks))
        ids = unit.token_ids.tolist()
        plain = plain_len(unit)
        out = []
        if plain:
            seq = Sequence(0, 0, ids[:plain], plain, 1, block_table=table)
            out += [
                ScheduledChunk(seq, s, min(size, plain - s), sample=False, two_level=False)
                for s in range(0, plain, size)
            ]
        if plain < n:
            tree = Sequence(
                1, 0, ids, n, 1, block_table=table, rope_positions=unit.rope, key_ends=unit.key_ends
            )
            out += [
                ScheduledChunk(tree, s, min(size, n - s), sample=False, two_level=False)
                for s in range(plain, n, size)
            ]
        return [(c, build_layout([c], self.block_size, trees=c.seq.key_ends is not None)) for c in out]
