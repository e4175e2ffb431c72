"""The attention-backend seam: the host batch layout, the registry, and backends agreeing with the reference."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch

from batchllm.engine.attention import AttentionBackend, KVShape, create_backend, resolve_name
from batchllm.engine.graphs import graph_sizes, group_capacity, table_width
from batchllm.engine.rope import Rope
from batchllm.engine.runner import build_layout
from batchllm.engine.sequence import ScheduledChunk, Sequence
from batchllm.engine.staging import Staging
from tests.rope_tables import random_rope_table

BS = 4
FUSED_ROPE = ("triton", "fa3", "flashinfer")  # backends whose store fuses with RoPE (``store_slots``)


def _rope(positions: np.ndarray, head_dim: int, dtype: torch.dtype, device: str, fused: bool) -> Rope:
    """A step's RoPE over a table of random angles."""
    table = random_rope_table(64, head_dim, torch.Generator().manual_seed(11)).to(device)
    return Rope(table, torch.from_numpy(positions).to(device), dtype, fused)


def _chunk(seq: Sequence, start: int, num_tokens: int, sample: bool = True) -> ScheduledChunk:
    return ScheduledChunk(seq, start, num_tokens, sample)


def _seq(seq_id: int, n: int, blocks: list[int], group: int | None = None, shared: int = 0) -> Sequence:
    s = Sequence(seq_id, seq_id, list(range(100 + seq_id, 100 + seq_id + n)), n, 4, block_table=blocks)
    s.group_id, s.num_shared_tokens = group, shared
    return s


def _batch() -> list[ScheduledChunk]:
    """A plain prefill chunk, a plain decode row, then a group of three members sharing 8 prefix tokens."""
    prefix = [20, 21]
    return [
        _chunk(_seq(0, 10, [1, 2, 3]), 4, 6),  # chunked prefill after 4 cached tokens
        _chunk(_seq(1, 5, [4, 5]), 4, 1),  # decode
        _chunk(_seq(2, 12, [*prefix, 6]), 8, 4, True),  # member suffix prefill
        _chunk(_seq(3, 13, [*prefix, 7, 8]), 12, 1),  # member decode
        _chunk(_seq(4, 11, [*prefix, 9]), 10, 1),
    ]


def _set_groups(chunks: list[ScheduledChunk]) -> None:
    for c in chunks[2:]:
        c.seq.group_id, c.seq.num_shared_tokens = 7, 8


def test_layout_describes_the_batch() -> None:
    chunks = _batch()
    _set_groups(chunks)
    lay = build_layout(chunks, BS)
    assert lay.q_lens.tolist() == [6, 1, 4, 1, 1] and lay.kv_lens.tolist() == [10, 5, 12, 13, 11]
    assert lay.positions.tolist() == [4, 5, 6, 7, 8, 9, 4, 8, 9, 10, 11, 12, 10]
    assert lay.input_ids.tolist()[:6] == [104, 105, 106, 107, 108, 109]
    # slot = block * BS + offset, through each chunk's own table
    assert lay.slot_mapping.tolist()[:7] == [
        2 * BS + 0,
        2 * BS + 1,
        2 * BS + 2,
        2 * BS + 3,
        3 * BS,
        3 * BS + 1,
        5 * BS,
    ]
    assert lay.start_pos.tolist() == [0, 0, 8, 8, 8]
    assert lay.group_seqs.tolist() == [2, 5] and lay.group_prefix_lens.tolist() == [8]
    assert lay.group_block_tables.tolist() == [[20, 21]]
    assert lay.block_tables[1].tolist() == [4, 5, -1, -1]
    assert not lay.is_decode


def test_layout_rejects_interleaved_groups() -> None:
    chunks = _batch()
    _set_groups(chunks)
    with pytest.raises(AssertionError):
        build_layout([chunks[2], chunks[0], *chunks[3:]], BS)


def test_decode_padding_uses_the_scratch_block() -> None:
    """Rows of a graph past a step's sequences write one key to the scratch block and read one key of the
    first block of their table, whatever an earlier, larger step left there."""
    pytest.importorskip("triton")
    chunks = [_chunk(_seq(i, 5 + i, [i, 10 + i]), 4 + i, 1) for i in range(3)]
    lay = build_layout(chunks, BS)
    assert lay.is_decode
    backend = create_backend("triton", KVShape(1, 50, BS, 2, 16, torch.float32, torch.device("cpu")))
    staging = Staging(backend.graph_fields(8, max_groups=2, width=4), torch.device("cpu"))
    host = staging.host()
    host["kv_lens"][:], host["block_tables"][:] = 7, 3  # a previous step of 8 rows
    staging.ship()
    backend.fill_graph_meta(staging.host(), lay)
    staging.ship(tail_rows=lay.num_seqs)
    meta = staging.device
    assert meta["slot_mapping"][3:].tolist() == [200] * 5 and meta["kv_lens"][3:].tolist() == [1] * 5
    assert meta["block_tables"][3:, 0].tolist() == [3] * 5 and meta["kv_lens"][:3].tolist() == [5, 6, 7]
    assert meta["block_tables"][:3, :2].tolist() == [[0, 10], [1, 11], [2, 12]]
    assert graph_sizes(600)[-4:] == [448, 480, 512, 576] and graph_sizes(1) == [1]
    assert graph_sizes(40) == [1, 2, 4, 8, 16, 32]


def test_graph_slots_and_widths_follow_the_step() -> None:
    """Group slots and table columns go by powers of two of what a step holds: few keys per run, and a
    step at a model's full context (8,192 blocks of 16) ships and splits for the blocks it has."""
    assert [group_capacity(g, 1600) for g in (0, 1, 2, 3, 100, 128, 129)] == [1, 1, 2, 4, 128, 128, 256]
    assert group_capacity(50, 32) == 32
    assert [table_width(b, 8192) for b in (1, 16, 17, 144, 8192)] == [16, 16, 32, 256, 8192]
    assert table_width(300, 256) == 256  # never wider than the context


@pytest.mark.parametrize(("slots", "widened"), [(2, False), (4, False), (2, True)])
def test_triton_graph_metadata_equals_the_step_metadata(slots: int, widened: bool) -> None:
    """A decode step run through the static metadata of a padded graph (8 rows, ``slots`` group slots,
    the empty ones included) attends exactly as through its own metadata (Triton, interpreted on CPU).
    widened: the step's block tables are wider than the graph's (steady decode pads them by columns of
    -1), the extra columns unused."""
    pytest.importorskip("triton")
    prefix_a, prefix_b = [20, 21], [22, 23]
    chunks = [
        _chunk(_seq(0, 5, [1, 2]), 4, 1),  # a plain decode row
        *(_chunk(_seq(1 + i, 11 + i, [*prefix_a, 3 + i]), 10 + i, 1) for i in range(2)),
        *(
            _chunk(_seq(3 + i, 9 + 2 * i, [*prefix_b, 10 + 2 * i, 11 + 2 * i]), 8 + 2 * i, 1)
            for i in range(3)
        ),
    ]
    for c in chunks[1:3]:
        c.seq.group_id, c.seq.num_shared_tokens = 1, 8
    for c in chunks[3:]:
        c.seq.group_id, c.seq.num_shared_tokens = 2, 8
    lay = build_layout(chunks, BS)
    assert lay.is_decode and lay.num_groups == 2
    shape = KVShape(1, 32, BS, 2, 16, torch.float32, torch.device("cpu"))
    backend = create_backend("triton", shape)
    gen = torch.Generator().manual_seed(0)
    backend.kv_cache.copy_(torch.randn(backend.kv_cache.shape, generator=gen))
    q = torch.randn(8, 4, 16, generator=gen)
    want = backend.forward(0, q[: lay.num_seqs], backend.prepare(lay), 0.25)
    staging = Staging(backend.graph_fields(8, max_groups=slots, width=8), torch.device("cpu"))
    meta = backend.graph_meta(staging.device)
    if widened:
        lay = replace(lay, block_tables=np.pad(lay.block_tables, ((0, 0), (0, 12)), constant_values=-1))
    backend.fill_graph_meta(staging.host(), lay)
    staging.ship(tail_rows=lay.num_seqs)
    got = backend.forward(0, q, meta, 0.25)[: lay.num_seqs]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_registry() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_name("auto", cpu) == "cpu" and resolve_name("fa3", cpu) == "fa3"
    assert resolve_name("auto", cuda, torch.float32) == "triton"  # FA3 is 16-bit only
    with pytest.raises(ValueError, match="attention: must be one of"):
        resolve_name("flash", cpu)
    shape = KVShape(2, 6, BS, 2, 8, torch.float32, torch.device("cpu"))
    backend = create_backend("torch", shape)
    assert backend.kv_cache.shape == (2, 2, 7, 2, BS, 8) and backend.scratch_block == 6


def _run_backend(
    name: str,
    chunks: list[ScheduledChunk],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    head_dim: int = 16,
    block: int = BS,
    wrap: Callable[[AttentionBackend], None] | None = None,
) -> torch.Tensor:
    """Store random keys for every cached position, then rotate the step's queries and keys and store
    them (``rope_store``: one kernel on the backends of FUSED_ROPE, plain torch and ``store`` on the
    others) and attend, layer 0 (the same values for every backend, dtype and device: drawn in float32
    on the CPU, then cast).
    wrap: called with the backend before the step (to observe it)."""
    shape = KVShape(1, 32, block, 2, head_dim, dtype, torch.device(device))
    backend = create_backend(name, shape)
    if wrap is not None:
        wrap(backend)
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(
        (2, 1, 33, 2, block, head_dim), generator=gen
    )  # the base [.., block, kv_head, ..] layout
    if name == "cpu":
        cache = cache.permute(0, 1, 3, 2, 4, 5)  # the cpu backend's [.., kv_head, block, ..]: same values
    backend.kv_cache.copy_(cache)
    lay = build_layout(chunks, block)
    meta = backend.prepare(lay)
    q = torch.randn(lay.num_tokens, 4, head_dim, generator=gen).to(device, dtype)
    # keys and values as the model hands them over: strided views of one projection output
    kv = (
        torch.randn(2, lay.num_tokens, 2, head_dim, generator=gen)
        .to(device, dtype)
        .transpose(0, 1)
        .contiguous()
    )
    k, v = kv.unbind(1)
    rope = _rope(lay.positions, head_dim, dtype, device, fused=name in FUSED_ROPE)
    q = backend.rope_store(0, rope, (q, k, v), meta, fresh_q=True)
    return backend.forward(0, q, meta, head_dim**-0.5)


def test_triton_backend_matches_the_reference() -> None:
    pytest.importorskip("triton")
    chunks = _batch()
    _set_groups(chunks)
    ref = _run_backend("torch", chunks)
    got = _run_backend("triton", chunks)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["plain", "grouped", "decode"])
@pytest.mark.parametrize("name", ["triton", "flashinfer"])
def test_cuda_backends_match_the_reference(name: str, kind: str) -> None:
    """bf16 backends on CUDA against the float32 torch reference on the same values: chunked prefill,
    decode and group members in one step, or a decode-only step with a group; head_dim 64 and 128."""
    pytest.importorskip(name)
    chunks = _batch()
    if kind != "plain":
        _set_groups(chunks)
    if kind == "decode":
        chunks = [c for c in chunks if c.num_tokens == 1]
    for head_dim in (64, 128):
        ref = _run_backend("torch", chunks, device="cuda", head_dim=head_dim)
        got = _run_backend(name, chunks, dtype=torch.bfloat16, device="cuda", head_dim=head_dim)
        torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["plain", "grouped", "decode"])
def test_cpu_backend_in_bfloat16(kind: str) -> None:
    """The cpu backend over a bf16 pool (its decode rows gather blocks into one masked call) stays
    within bf16 rounding of the float32 reference."""
    chunks = _batch()
    if kind != "plain":
        _set_groups(chunks)
    if kind == "decode":
        chunks = [c for c in chunks if c.num_tokens == 1]
    ref = _run_backend("torch", chunks, head_dim=64)
    got = _run_backend("cpu", chunks, dtype=torch.bfloat16, head_dim=64)
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


def test_flashinfer_refuses_what_it_cannot_run() -> None:
    """Clear errors before any pool is made: no CPU, no float32."""
    cpu = KVShape(1, 4, BS, 2, 64, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="'flashinfer' runs on CUDA only"):
        create_backend("flashinfer", cpu)
    if torch.cuda.is_available():
        f32 = KVShape(1, 4, BS, 2, 64, torch.float32, torch.device("cuda"))
        with pytest.raises(ValueError, match="needs bfloat16 or float16"):
            create_backend("flashinfer", f32)


def test_flashinfer_launches() -> None:
    """The host plan of a FlashInfer step: decode rows and prefill chunks in separate launches over
    their own pages (members from their prefix end), each group's rows against its prefix pages."""
    from batchllm.engine.attention.flashinfer import FlashInferBackend

    chunks = _batch()
    _set_groups(chunks)
    backend = FlashInferBackend.__new__(FlashInferBackend)  # the host side only: no CUDA, no flashinfer
    backend.shape = KVShape(1, 32, BS, 2, 64, torch.bfloat16, torch.device("cpu"))
    meta = backend.prepare(build_layout(chunks, BS))
    d, p, g = meta.decode, meta.prefill, meta.prefix
    assert d.rows.tolist() == [6, 11, 12] and d.qo_indptr.tolist() == [0, 1, 2, 3]
    assert d.kv_indices.tolist() == [4, 5, 7, 8, 9] and d.kv_indptr.tolist() == [0, 2, 4, 5]
    assert d.last_page_len.tolist() == [1, 1, 3]
    assert p.rows.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10] and p.qo_indptr.tolist() == [0, 6, 10]
    assert p.kv_indices.tolist() == [1, 2, 3, 6] and p.last_page_len.tolist() == [2, 4]
    assert g.rows == slice(7, 13) and g.qo_indptr.tolist() == [0, 6]
    assert g.kv_indices.tolist() == [20, 21] and g.last_page_len.tolist() == [4]
    plain = backend.prepare(build_layout(_batch()[:2], BS))  # contiguous runs take slices, no gathers
    assert plain.prefill.rows == slice(0, 6) and plain.decode.rows == slice(6, 7) and plain.prefix is None


def test_flashinfer_two_level_only_where_it_pays() -> None:
    """Decode steps of small groups read whole contexts through FlashInfer's decode kernel; large groups
    with long prefixes, and every prefill step with groups, take the two-level path."""
    from batchllm.engine.attention.flashinfer import FlashInferBackend, fi_two_level_pays

    backend = FlashInferBackend.__new__(FlashInferBackend)
    backend.shape = KVShape(1, 4096, BS, 2, 64, torch.bfloat16, torch.device("cpu"))
    decode_small = [c for c in _batch() if c.num_tokens == 1]
    _set_groups(decode_small)
    lay = build_layout(decode_small, BS)
    assert lay.is_decode and lay.num_groups and not fi_two_level_pays(lay)
    meta = backend.prepare(lay)
    assert meta.prefix is None and meta.decode.kv_indices.tolist() == [4, 5, 20, 21, 7, 8, 20, 21, 9]
    mixed = _batch()
    _set_groups(mixed)
    assert fi_two_level_pays(build_layout(mixed, BS))  # a member prefills: always two-level
    prefix = list(range(1000, 1256))  # 256 blocks of 4: 1,024 tokens
    members = [_chunk(_seq(i, 1030, [*prefix, 2000 + i, 3000 + i]), 1029, 1) for i in range(8)]
    for c in members:
        c.seq.group_id, c.seq.num_shared_tokens = 1, 1024
    big = build_layout(members, BS)
    assert fi_two_level_pays(big) and backend.prepare(big).prefix is not None


def test_grouped_equals_plain_in_the_reference() -> None:
    """Two-level attention over a shared prefix = plain attention over the same blocks."""
    chunks = _batch()
    plain = _run_backend("torch", chunks)
    _set_groups(chunks)
    grouped = _run_backend("torch", chunks)
    np.testing.assert_allclose(grouped.numpy(), plain.numpy(), atol=1e-5)


def test_engine_triton_equals_torch(tmp_path) -> None:
    """The whole engine, sharing on and off: Triton kernels (interpreted on CPU) give the reference's tokens."""
    pytest.importorskip("triton")
    from batchllm.engine import Engine, SamplingParams
    from bench.gpu_check import build_model, workload

    build_model(tmp_path)
    prompts = workload(2, 3, 32, 512)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    tokens = {}
    for attention in ("torch", "triton"):
        for sharing in (True, False):
            engine = Engine(tmp_path, attention=attention, enable_sharing=sharing, kv_cache_tokens=2048)
            tokens[attention, sharing] = [r.token_ids for r in engine.generate(prompts, params)]
            assert engine.stats.saving_ratio > 0.4 if sharing else engine.stats.saving_ratio == 0.0
    assert all(t == tokens["torch", True] for t in tokens.values())


def test_engine_without_two_level_reads_the_shared_prefix_plain(tmp_path, monkeypatch) -> None:
    """cost.ENABLED = False (bench.config_ab's plain side of an A/B): each prefix is still computed once
    and shared, every step reads it through the members' block tables, and the tokens are two-level's."""
    from batchllm.engine import Engine, SamplingParams
    from batchllm.engine.attention import cost
    from bench.gpu_check import build_model, workload

    build_model(tmp_path)
    prompts, params = workload(2, 3, 160, 512), SamplingParams(max_tokens=4, ignore_eos=True)
    tokens, groups = {}, {}
    for enabled in (True, False):
        monkeypatch.setattr(cost, "ENABLED", enabled)
        engine = Engine(tmp_path, attention="torch", kv_cache_tokens=2048)
        prepare, seen = engine.runner.attention.prepare, []
        engine.runner.attention.prepare = lambda layout, f=prepare, s=seen: (
            s.append(layout.num_groups) or f(layout)
        )
        tokens[enabled] = [r.token_ids for r in engine.generate(prompts, params)]
        groups[enabled] = seen
        assert engine.stats.saving_ratio > 0.4 and engine.stats.prefixes_computed == 2
    assert max(groups[True]) == 2 and max(groups[False]) == 0
    assert tokens[False] == tokens[True]


def test_cost_model_sends_small_groups_to_the_plain_path() -> None:
    from batchllm.engine.attention.cost import two_level_pays
    from batchllm.engine.sequence import grouped_chunks

    assert not two_level_pays(1, 4000)  # a group of one never pays (sd=1 measured 5% slower)
    assert two_level_pays(4, 512) and two_level_pays(16, 2000)  # measured wins
    assert not two_level_pays(2, 128) and two_level_pays(2, 144) and two_level_pays(4, 64)
    plain = _chunk(_seq(0, 10, [1, 2, 3]), 4, 6)
    pair = [_chunk(_seq(i, 10, [20, 21, 5 + i]), 9, 1) for i in (1, 2)]  # a pair sharing 8 tokens
    four = [_chunk(_seq(i, 70, [*range(30, 48), 50 + i]), 69, 1) for i in (3, 4, 5, 6)]  # 4 x 64
    for c in pair:
        c.seq.group_id, c.seq.num_shared_tokens = 1, 8
    for c in four:
        c.seq.group_id, c.seq.num_shared_tokens = 2, 64
    ordered = grouped_chunks([four[0], pair[0], plain, *four[1:], pair[1]])
    assert [c.seq.seq_id for c in ordered] == [0, 1, 2, 3, 4, 5, 6]  # the pair went plain
    assert [c.two_level for c in ordered] == [True, False, False, True, True, True, True]
    lay = build_layout(ordered, BS)
    assert lay.group_seqs.tolist() == [3, 7] and lay.group_prefix_lens.tolist() == [64]
    assert lay.start_pos.tolist() == [0, 0, 0, 64, 64, 64, 64]  # the pair reads its prefix as its own keys


def test_teacher_forced_agreement_of_an_engine_with_itself(tmp_path) -> None:
    """bench.gpu_check's teacher-forced metric: feeding float32 greedy outputs back position by position
    (prefix-shared one-token requests) reproduces every token; a wrong reference token is counted."""
    from batchllm.engine import Engine, SamplingParams
    from bench.gpu_check import build_model, teacher_forced, workload

    build_model(tmp_path)
    prompts = workload(2, 2, 16, 512)
    engine = Engine(tmp_path, device="cpu", kv_cache_tokens=2048)
    reference = [
        list(r.token_ids) for r in engine.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    ]
    share, misses = teacher_forced(tmp_path, prompts, reference, device="cpu")
    assert share == 1.0 and misses == []
    reference[1][3] = (reference[1][3] + 1) % 512  # one wrong reference token: one miss, at (1, 3)
    share, misses = teacher_forced(tmp_path, prompts, reference, device="cpu")
    assert misses[0] == (1, 3) and share < 1.0


def _fake_fa3(q, k, v, *, max_seqlen_q, cu_seqlens_q, max_seqlen_k, softmax_scale, causal, fa_version,
              seqused_k=None, block_table=None, cu_seqlens_k=None):  # fmt: skip
    """FlashAttention-3's varlen semantics in plain torch: paged (block_table; k, v [block, offset, kv_head,
    dim], seqused_k keys each) or unpaged (cu_seqlens_k; k, v [tokens, kv_head, dim]); causal from the
    bottom right (query j of n sees keys < kv_len - n + j + 1)."""
    assert causal and fa_version == 3 and k.shape == v.shape and k.shape[-2] == 2  # kv_head
    assert (block_table is None) == (seqused_k is None) == (cu_seqlens_k is not None)
    out = torch.empty_like(q)
    g = q.shape[1] // k.shape[-2]
    for i in range(len(cu_seqlens_q) - 1):
        lo, hi = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        if block_table is None:
            first, length = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1] - cu_seqlens_k[i])
            assert length <= max_seqlen_k
            keys = k[first : first + length].repeat_interleave(g, 1)
            vals = v[first : first + length].repeat_interleave(g, 1)
        else:
            assert k.shape[1] == BS  # offset
            length = int(seqused_k[i])
            pages = block_table[i, : -(-length // BS)].long()
            keys = k[pages].reshape(-1, *k.shape[2:])[:length].repeat_interleave(g, 1)
            vals = v[pages].reshape(-1, *v.shape[2:])[:length].repeat_interleave(g, 1)
        s = torch.einsum("nhd,lhd->hnl", q[lo:hi].float(), keys.float()) * softmax_scale
        n = hi - lo
        seen = torch.arange(length)[None, :] < (length - n + torch.arange(n) + 1)[:, None]
        s = s.masked_fill(~seen[None], float("-inf"))
        out[lo:hi] = torch.einsum("hnl,lhd->nhd", s.softmax(-1), vals.float()).to(q.dtype)
    return out


def _recording_paging(fa: Callable[..., torch.Tensor], paged: list[bool]) -> Callable[..., torch.Tensor]:
    """fa, appending to ``paged`` whether each call read through a block table."""

    def call(*args: object, **kwargs: object) -> torch.Tensor:
        paged.append(kwargs.get("block_table") is not None)
        return fa(*args, **kwargs)

    return call


def _whole_prompts() -> list[ScheduledChunk]:
    """Three prompts from position 0: no sequence has cached keys."""
    return [
        _chunk(_seq(0, 6, [1, 2]), 0, 6),
        _chunk(_seq(1, 9, [4, 5, 6]), 0, 9),
        _chunk(_seq(2, 3, [7]), 0, 3),
    ]


def _decode_group() -> list[ScheduledChunk]:
    """A plain prefill chunk, a group with a prefilling member, and a group whose rows are all decode rows."""
    return [
        _chunk(_seq(0, 10, [1, 2, 3]), 4, 6),
        _chunk(_seq(2, 12, [20, 21, 6], group=7, shared=8), 8, 4),
        _chunk(_seq(3, 13, [20, 21, 7, 8], group=7, shared=8), 12, 1),
        _chunk(_seq(4, 10, [22, 9, 10], group=8, shared=4), 9, 1),
        _chunk(_seq(5, 6, [22, 11], group=8, shared=4), 5, 1),
    ]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors: the interpreter"
)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kind", ["plain", "grouped", "decode_group", "decode", "fresh"])
def test_fa3_backend_reads_the_pool_through_a_strided_view(monkeypatch, kind: str, split: bool) -> None:
    """The fa3 backend's glue on CPU with FA3's semantics in torch: prefill steps pass every sequence's
    whole block table and the pool as a [block, offset, kv_head, dim] view; decode steps run triton;
    split: a mixed step's decode rows (decode_group: a whole group of them) get one key in FA3 and are
    redone by the Triton decode launch; fresh (whole prompts, nothing cached): FA3 reads the step's own
    keys and values unpaged, as stored."""
    from batchllm.engine.attention import triton as tb
    from batchllm.engine.attention.fa3 import FA3Backend, FA3Meta
    from batchllm.engine.attention.triton import TritonBackend

    pytest.importorskip("triton")
    if split:
        monkeypatch.setattr(tb, "DECODE_SPLIT_MIN_ROWS", 2)
    chunks = {"fresh": _whole_prompts, "decode_group": _decode_group}.get(kind, _batch)()
    if kind in ("grouped", "decode"):
        _set_groups(chunks)
    if kind == "decode":
        chunks = [c for c in chunks if c.num_tokens == 1]
    ref = _run_backend("torch", chunks)
    shape = KVShape(1, 32, BS, 2, 16, torch.float32, torch.device("cpu"))
    backend = FA3Backend.__new__(FA3Backend)  # no CUDA here: the Triton side under its interpreter
    TritonBackend.__init__(backend, shape)
    paged: list[bool] = []
    backend._fa = _recording_paging(_fake_fa3, paged)
    gen = torch.Generator().manual_seed(0)
    backend.kv_cache.copy_(torch.randn((2, 1, 33, 2, BS, 16), generator=gen))
    lay = build_layout(chunks, BS)
    meta = backend.prepare(lay)
    assert isinstance(meta, FA3Meta) == (kind != "decode")
    if isinstance(meta, FA3Meta):
        assert (meta.triton.decode is not None) == (split and kind != "fresh")
        assert meta.fresh == (kind == "fresh")
    q = torch.randn(lay.num_tokens, 4, 16, generator=gen)
    # keys and values as the model hands them over: strided views of one projection output
    k, v = torch.randn(2, lay.num_tokens, 2, 16, generator=gen).transpose(0, 1).contiguous().unbind(1)
    q = backend.rope_store(
        0, _rope(lay.positions, 16, torch.float32, "cpu", fused=True), (q, k, v), meta, True
    )
    torch.testing.assert_close(backend.forward(0, q, meta, 16**-0.5), ref, atol=2e-5, rtol=1e-4)
    assert paged == ([] if kind == "decode" else [kind != "fresh"])
    if kind == "fresh":  # the pool still holds the (rotated) keys for later steps; the step let go of them
        assert meta.kv is None
        torch.testing.assert_close(
            backend.kv_cache[0, 0, 4].transpose(0, 1), k[6 : 6 + BS]
        )  # seq 1's first block


def test_fa3_refuses_what_it_cannot_run() -> None:
    cpu = KVShape(1, 4, BS, 2, 64, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="'fa3' runs on CUDA only"):
        create_backend("fa3", cpu)


@pytest.mark.gpu
def test_auto_is_fa3_where_it_runs() -> None:
    """On CUDA, 'auto' is fa3 for 16-bit KV on Hopper with vLLM's FA3 importable, else triton."""
    cuda = torch.device("cuda")
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401

        importable = True
    except Exception:
        importable = False
    hopper = torch.cuda.get_device_capability(cuda)[0] == 9
    assert resolve_name("auto", cuda, torch.bfloat16) == ("fa3" if importable and hopper else "triton")
    assert resolve_name("auto", cuda, torch.float32) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["plain", "grouped", "decode_group"])
@pytest.mark.parametrize("split", [False, True])
def test_fa3_backend_matches_the_reference(monkeypatch, kind: str, split: bool) -> None:
    """vLLM's FlashAttention-3 (where vLLM is installed) through the fa3 backend, 16-token blocks, bf16,
    head_dim 64 and 128, against the float32 torch reference: prefill chunks, members and decode rows
    (split: the decode rows through the Triton decode launch; decode_group: also a group of decode rows
    only)."""
    from batchllm.engine.attention import triton as tb

    pytest.importorskip("vllm.vllm_flash_attn")
    if split:
        monkeypatch.setattr(tb, "DECODE_SPLIT_MIN_ROWS", 2)
    prefix = [20, 21]
    chunks = [
        _chunk(_seq(0, 40, [1, 2, 3]), 16, 24),  # chunked prefill after 16 cached tokens
        _chunk(_seq(1, 20, [4, 5]), 19, 1),  # decode
        _chunk(_seq(2, 45, [*prefix, 6]), 32, 13),  # member suffix prefill
        _chunk(_seq(3, 50, [*prefix, 7, 8]), 49, 1),  # member decode
        _chunk(_seq(4, 40, [*prefix, 9]), 35, 5),
    ]
    if kind != "plain":
        for c in chunks[2:]:
            c.seq.group_id, c.seq.num_shared_tokens = 7, 32
    if kind == "decode_group":
        chunks += [
            _chunk(_seq(5, 40, [22, 23, 10], 8, 32), 39, 1),
            _chunk(_seq(6, 36, [22, 23, 11], 8, 32), 35, 1),
        ]
    for head_dim in (64, 128):
        ref = _run_backend("torch", chunks, device="cuda", head_dim=head_dim, block=16)
        got = _run_backend("fa3", chunks, dtype=torch.bfloat16, device="cuda", head_dim=head_dim, block=16)
        torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_fa3_reads_whole_prompts_unpaged_on_cuda() -> None:
    """A step of whole prompts (nothing cached) through vLLM's FA3: the step's own keys and values,
    unpaged (the call records it), as strided views of one projection output, against the float32
    torch reference; head_dim 64 and 128."""
    pytest.importorskip("vllm.vllm_flash_attn")
    chunks = [_chunk(_seq(0, 40, [1, 2, 3]), 0, 40), _chunk(_seq(1, 17, [4, 5]), 0, 17)]
    paged: list[bool] = []

    def record(backend: AttentionBackend) -> None:
        backend._fa = _recording_paging(backend._fa, paged)  # type: ignore[attr-defined]

    for head_dim in (64, 128):
        paged.clear()
        ref = _run_backend("torch", chunks, device="cuda", head_dim=head_dim, block=16)
        got = _run_backend(
            "fa3", chunks, dtype=torch.bfloat16, device="cuda", head_dim=head_dim, block=16, wrap=record
        )
        assert paged == [False]
        torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["plain", "mixed_group", "decode_group"])
def test_triton_splits_a_mixed_step(monkeypatch, kind: str, device: str) -> None:
    """Decode rows beside prefill chunks run in a launch of their own (decode tiles), over a prefill
    launch that sees them without keys: the same attention as the reference. decode_group: a group
    whose rows are all decode rows (its prefix emptied in the prefill launch)."""
    from batchllm.engine.attention import triton as tb

    pytest.importorskip("triton")
    monkeypatch.setattr(tb, "DECODE_SPLIT_MIN_ROWS", 2)
    chunks = _batch()
    if kind != "plain":
        _set_groups(chunks)
    if kind == "decode_group":
        chunks = [c for i, c in enumerate(chunks) if i != 2]  # the group keeps its two decode rows
    split = tb.split_decode(build_layout(chunks, BS))
    assert split is not None
    masked, decode, rows = split
    assert rows.tolist() == ([6, 11, 12] if kind != "decode_group" else [6, 7, 8])
    assert decode.q_lens.tolist() == [1, 1, 1] and decode.num_groups == (0 if kind == "plain" else 1)
    if kind == "decode_group":
        assert masked.group_prefix_lens.tolist() == [0] and decode.group_seqs.tolist() == [1, 3]
    if device == "cpu":
        ref, got = _run_backend("torch", chunks), _run_backend("triton", chunks)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
        return
    ref = _run_backend("torch", chunks, device="cuda", head_dim=128)
    got = _run_backend("triton", chunks, dtype=torch.bfloat16, device="cuda", head_dim=128)
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
