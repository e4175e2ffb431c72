"""ModelRunner: the only code that turns a scheduled batch into tensors and runs the model.

It owns the KV cache tensors and builds, per step, input ids, positions, the
slot mapping, block tables and the two-level attention layout: chunks of the
members of one group that read a shared prefix are placed next to each other
so the attention kernel reads that prefix once per group. It never touches
queues or block allocation (the scheduler does) and never decides when a
request ends (the engine does).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from batchllm.engine.model import CausalLM
from batchllm.engine.sampling import label_probs, row_keys, sample
from batchllm.engine.sequence import Sequence
from batchllm.kernels import AttentionMeta, GroupSpan, get_attention


class Chunk(Protocol):
    """What the runner needs from a scheduled chunk: compute seq.token_ids[start:start+num_tokens]."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool


@dataclass
class SeqSampling:
    """Sampling state the engine attaches to ``Sequence.params``."""

    temperature: float
    top_p: float
    top_k: int
    seed: int  # 64-bit; the random numbers of a token depend on (seed, position) only


def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int) -> None:
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        cfg = model.cfg
        param = model.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        # [k|v, layer, block, kv_head, offset, head_dim] (the layout of batchllm.kernels)
        shape = (2, cfg.num_layers, num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        attn_fn = get_attention(self.device)
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]
            layer.self_attn.attn_fn = attn_fn

    def order(self, chunks: Seq[Chunk]) -> list[Chunk]:
        """Chunks with the members of one group (reading its shared prefix) next to each other."""
        plain = [c for c in chunks if c.seq.num_shared_tokens == 0]
        shared = sorted(
            (c for c in chunks if c.seq.num_shared_tokens > 0),
            key=lambda c: c.seq.group_id,  # a group's members all share num_shared_tokens
        )
        return plain + shared

    def prepare(self, chunks: Seq[Chunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMeta]:
        """Input ids, positions and attention layout of ``chunks`` (already in ``order``)."""
        bs = self.block_size
        num_seqs = len(chunks)
        q_lens = [c.num_tokens for c in chunks]
        kv_lens = [c.start + c.num_tokens for c in chunks]
        max_blocks = max((k + bs - 1) // bs for k in kv_lens)
        tables = np.full((num_seqs, max_blocks), -1, dtype=np.int64)
        ids, pos = [], []
        groups: list[GroupSpan] = []
        for i, c in enumerate(chunks):
            seq = c.seq
            n_blocks = (kv_lens[i] + bs - 1) // bs
            assert len(seq.block_table) >= n_blocks, "scheduler must allocate blocks before the step"
            tables[i, :n_blocks] = seq.block_table[:n_blocks]
            ids.append(np.asarray(seq.token_ids[c.start : c.start + c.num_tokens], dtype=np.int64))
            pos.append(np.arange(c.start, c.start + c.num_tokens, dtype=np.int64))
            shared = seq.num_shared_tokens
            if shared > 0:
                assert shared % bs == 0 and c.start >= shared, "a member never recomputes its group prefix"
                prev = chunks[i - 1].seq if i > 0 else None
                if groups and groups[-1].seq_end == i and prev is not None and prev.group_id == seq.group_id:
                    assert prev.block_table[: shared // bs] == seq.block_table[: shared // bs]
                    groups[-1] = GroupSpan(groups[-1].seq_start, i + 1, shared)
                else:
                    groups.append(GroupSpan(i, i + 1, shared))
        positions = np.concatenate(pos)
        rows = np.repeat(np.arange(num_seqs), q_lens)  # the chunk of each token
        slots = tables[rows, positions // bs] * bs + positions % bs
        dev = self.device
        meta = AttentionMeta(
            slot_mapping=torch.from_numpy(slots).to(dev),
            cu_seqlens_q=torch.from_numpy(np.cumsum([0, *q_lens]).astype(np.int32)).to(dev),
            kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(tables.astype(np.int32)).to(dev),
            groups=tuple(groups),
            q_lens_host=q_lens,
            kv_lens_host=kv_lens,
        )
        return torch.from_numpy(np.concatenate(ids)).to(dev), torch.from_numpy(positions).to(dev), meta

    @torch.inference_mode()
    def forward(self, chunks: Seq[Chunk]) -> tuple[list[Chunk], torch.Tensor]:
        """Run one step; returns the chunks in run order and the final hidden state of each chunk's last token."""
        chunks = self.order(chunks)
        input_ids, positions, meta = self.prepare(chunks)
        hidden = self.model(input_ids, positions, meta)
        last = meta.cu_seqlens_q[1:].to(torch.int64) - 1
        return chunks, hidden[last]

    @torch.inference_mode()
    def sample(self, hidden: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
        """Next token of each sequence from its last hidden state [len(seqs), hidden]."""
        logits = self.logits(hidden)
        params: list[SeqSampling] = [s.params for s in seqs]
        if all(p.temperature == 0.0 for p in params):
            return logits.argmax(dim=-1).tolist()
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        top_ks = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev)
        seeds = torch.tensor([p.seed for p in params], dtype=torch.int64, device=dev)
        # the sampled token's position is the current length of the sequence
        positions = torch.tensor([s.num_tokens for s in seqs], dtype=torch.int64, device=dev)
        return sample(logits, temps, top_ps, top_ks, row_keys(seeds, positions)).tolist()

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def label_probs(self, hidden: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """Label-restricted distribution [rows, labels] at the given hidden states."""
        return label_probs(hidden, self.model.lm_head_weight, label_ids.to(hidden.device))
