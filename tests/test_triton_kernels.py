"""The Triton attention kernels (batchllm/kernels/paged/) against dense attention in plain torch.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
by conftest.py) at tiny sizes; with CUDA the same cases run natively, plus the
`gpu` tests at real sizes (head_dim 128, GQA 4, bf16).

Every case fills the whole KV pool with random values (so reading a wrong
block shows), shuffles the block ids, poisons the outputs with NaN, and
compares out and lse row by row with a float64 dense reference built from
the block tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from batchllm.kernels import paged as pa

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


# --------------------------------------------------------------------------- cases


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_q: torch.Tensor
    kv_lens: torch.Tensor
    tables: torch.Tensor
    prefix_lens: torch.Tensor
    cu_g: torch.Tensor
    g_lens: torch.Tensor
    g_tables: torch.Tensor
    scale: float
    specs: list[tuple[int, int, int]]  # (kv_len, q_len, prefix_len) of the real sequences
    spans: list[tuple[int, int, int]]  # (row_start, row_end, prefix_len) of the real groups
    max_q_len: int
    max_group_rows: int


def build(
    specs: list[tuple[int, int, int]],
    prefixes: list[int],
    *,
    kv_heads: int = 2,
    g: int = 4,
    dim: int = 32,
    block: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    pad_tokens: int = 0,
    pad_seqs: int = 0,
    pad_groups: int = 0,
    device: str = DEVICE,
) -> Batch:
    """specs: (kv_len, q_len, group or -1) per sequence, members of a group contiguous;
    prefixes[group]: its prefix length (a multiple of block). A plain sequence
    between groups becomes a span with prefix 0 (the two-level convention)."""
    gen = torch.Generator().manual_seed(seed)
    own_blocks = sum(-(-kv // block) for kv, _, _ in specs)
    num_blocks = own_blocks + sum(p // block for p in prefixes) + 3
    k_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=gen)
    v_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    prefix_blocks = [[free.pop() for _ in range(p // block)] for p in prefixes]
    tables, host_specs = [], []
    for kv_len, q_len, grp in specs:
        plen = prefixes[grp] if grp >= 0 else 0
        assert plen % block == 0 and plen <= kv_len - q_len
        shared = prefix_blocks[grp] if grp >= 0 else []
        tables.append(shared + [free.pop() for _ in range(-(-kv_len // block) - len(shared))])
        host_specs.append((kv_len, q_len, plen))
    width = max(len(t) for t in tables) + 1
    tables += [[] for _ in range(pad_seqs)]
    table_t = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    q_lens = [n for _, n, _ in specs] + [0] * pad_seqs
    cu_q = [0]
    for n in q_lens:
        cu_q.append(cu_q[-1] + n)
    num_tokens = cu_q[-1] + pad_tokens
    q = torch.randn(num_tokens, kv_heads * g, dim, generator=gen)
    # group spans over rows: from the first to the last grouped sequence
    grouped = [i for i, s in enumerate(specs) if s[2] >= 0]
    spans: list[tuple[int, int, int, list[int]]] = []
    if grouped:
        i = grouped[0]
        while i <= grouped[-1]:
            j = i
            while j <= grouped[-1] and specs[j][2] == specs[i][2]:
                j += 1
            grp = specs[i][2]
            spans.append(
                (cu_q[i], cu_q[j], prefixes[grp] if grp >= 0 else 0, prefix_blocks[grp] if grp >= 0 else [])
            )
            i = j
    g_width = max([len(b) for b in prefix_blocks] + [1]) + 1
    cu_g = [spans[0][0]] if spans else [0]
    for _, end, _, _ in spans:
        cu_g.append(end)
    cu_g += [cu_g[-1]] * pad_groups
    g_lens = [p for _, _, p, _ in spans] + [0] * pad_groups
    g_tables = [b + [-1] * (g_width - len(b)) for *_, b in spans] + [[-1] * g_width] * pad_groups
    kv_lens = [s[0] for s in specs] + [0] * pad_seqs
    prefix_lens = [s[2] for s in host_specs] + [0] * pad_seqs

    def i32(x, *shape):
        return torch.tensor(x, dtype=torch.int32).reshape(*shape).to(device)

    return Batch(
        q=q.to(device=device, dtype=dtype),
        k_cache=k_cache.to(device=device, dtype=dtype),
        v_cache=v_cache.to(device=device, dtype=dtype),
        cu_q=i32(cu_q, -1),
        kv_lens=i32(kv_lens, -1),
        tables=table_t.to(device),
        prefix_lens=i32(prefix_lens, -1),
        cu_g=i32(cu_g, -1),
        g_lens=i32(g_lens, -1),
        g_tables=i32(g_tables, len(g_tables), g_width),
        scale=1 / math.sqrt(dim),
        specs=host_specs,
        spans=[(a, b, p) for a, b, p, _ in spans],
        max_q_len=max(q_lens),
        max_group_rows=max([b - a for a, b, _, _ in spans] + [1]),
    )


def _keys(b: Batch, cache: torch.Tensor, i: int, lo: int, hi: int) -> torch.Tensor:
    """[hi - lo, kv_heads, dim] float64 keys or values of sequence i at positions [lo, hi)."""
    pos = torch.arange(lo, hi, device=cache.device)
    bs = cache.shape[2]
    blocks = b.tables[i].long()[pos // bs]
    return cache[blocks, :, pos % bs].double()


def dense(b: Batch, i: int, lo: int, hi: int, causal: bool, rows: slice | None = None):
    """(out, lse) of sequence i's rows over keys [lo, hi): float64, [q_len, H, D] and [q_len, H]."""
    kv_len, q_len, _ = b.specs[i]
    start = int(b.cu_q[i])
    q = b.q[rows if rows is not None else slice(start, start + q_len)].double()
    k, v = _keys(b, b.k_cache, i, lo, hi), _keys(b, b.v_cache, i, lo, hi)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("nhd,lhd->hnl", q, k) * b.scale
    if causal:
        qpos = torch.arange(kv_len - q_len, kv_len, device=s.device)[:, None]
        s = s.masked_fill(torch.arange(lo, hi, device=s.device)[None, :] > qpos, -math.inf)
    lse = torch.logsumexp(s, -1)  # -inf where nothing is visible
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s - lse[..., None]), torch.zeros_like(s))
    return torch.einsum("hnl,lhd->nhd", p, v), lse.T


def _close(out, lse, ref_out, ref_lse, tol):
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse is -inf exactly where no key was visible"
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=tol, atol=tol)


def _poisoned(b: Batch):
    out = torch.full_like(b.q, float("nan"))
    lse = torch.full(b.q.shape[:2], float("nan"), dtype=torch.float32, device=b.q.device)
    return out, lse


def check_paged(b: Batch, own_only: bool, tol: float, max_q_len: int | None = None, **kw) -> None:
    out, lse = _poisoned(b)
    start = b.prefix_lens if own_only else None
    res = pa.paged_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        b.cu_q,
        b.kv_lens,
        b.tables,
        start,
        b.scale,
        b.max_q_len if max_q_len is None else max_q_len,
        out=out,
        lse=lse,
        **kw,
    )
    assert res[0] is out and res[1] is lse
    for i, (kv_len, q_len, plen) in enumerate(b.specs):
        rows = slice(int(b.cu_q[i]), int(b.cu_q[i]) + q_len)
        ref = dense(b, i, plen if own_only else 0, kv_len, causal=True)
        _close(out[rows], lse[rows], *ref, tol)


def check_prefix(b: Batch, tol: float, max_group_rows: int | None = -1, **kw) -> None:
    """max_group_rows -1: the true bound (one tile per group), None: no bound (binary search)."""
    out, lse = _poisoned(b)
    pa.prefix_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        b.cu_g,
        b.g_lens,
        b.g_tables,
        b.scale,
        max_group_rows=b.max_group_rows if max_group_rows == -1 else max_group_rows,
        out=out,
        lse=lse,
        **kw,
    )
    for i, (_, q_len, plen) in enumerate(b.specs):
        rows = slice(int(b.cu_q[i]), int(b.cu_q[i]) + q_len)
        in_span = any(a <= rows.start < e for a, e, _ in b.spans)
        if not in_span:
            continue
        ref = dense(b, i, 0, plen, causal=False)
        _close(out[rows], lse[rows], *ref, tol)


def check_two_level(b: Batch, tol: float, **kw) -> None:
    out, lse = _poisoned(b)
    pa.two_level_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        b.cu_q,
        b.kv_lens,
        b.tables,
        b.prefix_lens,
        b.cu_g,
        b.g_lens,
        b.g_tables,
        b.scale,
        b.max_q_len,
        max_group_rows=b.max_group_rows,
        out=out,
        lse=lse,
        **kw,
    )
    for i, (kv_len, q_len, _) in enumerate(b.specs):
        rows = slice(int(b.cu_q[i]), int(b.cu_q[i]) + q_len)
        _close(out[rows], lse[rows], *dense(b, i, 0, kv_len, causal=True), tol)
    pad = slice(int(b.cu_q[-1]), b.q.shape[0])
    assert torch.all(out[pad] == 0) and torch.all(lse[pad] == -math.inf), "padding rows: 0 and -inf"


# (kv_len, q_len, group) per sequence, prefix length per group
CASES = {
    "decode": ([(40, 1, -1), (16, 1, -1), (1, 1, -1), (67, 1, -1)], []),
    "prefill-from-zero": ([(21, 21, -1), (5, 5, -1), (16, 16, -1)], []),
    "chunked-prefill": ([(45, 13, -1), (70, 3, -1), (33, 17, -1)], []),
    "mixed": ([(40, 1, -1), (30, 30, -1), (50, 9, -1), (17, 1, -1)], []),
    "groups-decode": (
        [(40, 1, 0), (37, 1, 0), (33, 1, 0), (50, 1, 1), (70, 1, 2), (65, 1, 2), (20, 1, -1)],
        [32, 48, 64],
    ),
    "groups-mixed": (
        [(20, 1, -1), (50, 18, 0), (41, 1, 0), (47, 9, 0), (29, 3, -1), (80, 1, 1), (64, 1, 1)],
        [32, 48],
    ),
    # scoring: members prefill long suffixes after their group's prefix (wide prefix tiles: 8 warps)
    "groups-prefill": (
        [(100, 70, 0), (90, 60, 0), (96, 80, 0), (30, 5, -1), (60, 33, 1), (58, 40, 1)],
        [16, 16],
    ),
}


def _device_tol(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else (1e-4 if CUDA else 1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_paged_attention(name: str) -> None:
    specs, prefixes = CASES[name]
    b = build(specs, prefixes, g=4, dim=32, block=16, seed=1)
    check_paged(b, own_only=False, tol=_device_tol(torch.float32))
    if prefixes:
        check_paged(b, own_only=True, tol=_device_tol(torch.float32))


@pytest.mark.parametrize(
    ("g", "dim", "block", "splits"),
    [(1, 32, 16, 3), (4, 64, 32, 2), (3, 32, 16, 1)],
)
def test_paged_attention_shapes_and_splits(g: int, dim: int, block: int, splits: int) -> None:
    """MHA, GQA with a non-power-of-two group, head_dim 64, block 32, forced key splits, padded batch."""
    specs = [(70, 1, -1), (33, 1, -1), (50, 6, -1), (9, 9, -1)]
    b = build(specs, [], kv_heads=2, g=g, dim=dim, block=block, seed=2, pad_tokens=3, pad_seqs=2)
    check_paged(b, own_only=False, tol=_device_tol(torch.float32), num_splits=splits)


@pytest.mark.parametrize(("kv_heads", "g", "splits"), [(3, 4, 3), (3, 2, 1), (4, 1, 2)])
def test_paged_attention_decode_heads_per_tile(kv_heads: int, g: int, splits: int) -> None:
    """Decode tiles take the heads of several kv heads (a count that need not divide kv_heads)."""
    specs = [(70, 1, -1), (33, 1, -1), (5, 1, -1), (48, 1, -1)]
    b = build(specs, [], kv_heads=kv_heads, g=g, dim=32, block=16, seed=15, pad_seqs=1)
    check_paged(b, own_only=False, tol=_device_tol(torch.float32), num_splits=splits)


@pytest.mark.parametrize(
    ("members", "splits", "bound", "direct"),
    [(1, 1, -1, False), (5, 3, -1, True), (16, None, -1, False), (16, 2, None, True), (16, 1, 1, True)],
)
def test_prefix_attention(members: int, splits: int | None, bound: int | None, direct: bool) -> None:
    """Groups of 1..16 members (decode rows and one prefill chunk), prefixes of several blocks;
    a program per row tile (binary search), or with "prefix_direct" a program per group when the
    bound on rows per group allows, looping over its row tiles when the bound is understated."""
    specs = [(60 + 3 * m, 1, 0) for m in range(members)] + [(70, 1, 1), (90, 7, 1)]
    b = build(specs, [48, 64], g=4, dim=32, block=16, seed=3, pad_groups=2)
    pa.CONFIG_OVERRIDE["prefix_direct"] = int(direct)
    try:
        check_prefix(b, tol=_device_tol(torch.float32), max_group_rows=bound, num_splits=splits)
    finally:
        pa.CONFIG_OVERRIDE.pop("prefix_direct")


@pytest.mark.parametrize(("g", "kv_heads"), [(4, 3), (2, 2), (1, 4)])
def test_prefix_attention_groups_of_few_rows(g: int, kv_heads: int) -> None:
    """Groups of one or two decode rows: a tile takes the heads of several kv heads (two-level too)."""
    specs = [(60, 1, 0), (45, 1, 1), (50, 1, 1), (70, 1, 2), (20, 1, -1)]
    b = build(specs, [32, 16, 48], kv_heads=kv_heads, g=g, dim=32, block=16, seed=16, pad_groups=1)
    assert b.max_group_rows == 2
    check_prefix(b, tol=_device_tol(torch.float32))
    check_prefix(b, tol=_device_tol(torch.float32), num_splits=2)
    check_two_level(b, tol=_device_tol(torch.float32))


def test_wide_prefill_tiles_follow_the_mean_chunk() -> None:
    """256-row own tiles (16 warps) only when the step's sequences average 512+ rows: a mixed step's
    decode rows would each take a whole tile."""
    from batchllm.kernels.paged.heuristics import _num_warps, _rows_own

    assert _rows_own(4, 128, 2048, 2048.0) == 64 and _num_warps(256, 256) == 16
    assert _rows_own(4, 128, 2048, 38.0) == 32 and _num_warps(128, 128) == 8  # 16k tokens, 430 rows
    assert _rows_own(4, 128, 1, 1.0) == 1 and _num_warps(16, 4) == 4
    assert _rows_own(4, 256, 2048, 2048.0) == 16  # head_dim 256: 64-row tiles
    assert _rows_own(4, 128, 2048, 2048.0, elem_bytes=4) == 32  # float32: 128 rows fit shared memory
    pa.CONFIG_OVERRIDE["wide_own_rows"] = 1 << 30
    try:
        assert _rows_own(4, 128, 2048, 2048.0) == 32
    finally:
        pa.CONFIG_OVERRIDE.pop("wide_own_rows")


def test_paged_attention_wide_prefill_tiles() -> None:
    """Long prefill chunks take 256-row own tiles (64 tokens x 4 heads): same result as the reference."""
    from batchllm.kernels.paged.heuristics import _rows_own

    specs = [(300, 260, -1), (180, 180, -1), (40, 1, -1)]
    assert _rows_own(4, 32, 260, 441 / 3, elem_bytes=4) == 64
    b = build(specs, [], g=4, dim=32, block=16, seed=17, pad_tokens=1)
    check_paged(b, own_only=True, tol=_device_tol(torch.float32))


def test_paged_attention_understated_max_q_len() -> None:
    """max_q_len=1 on a batch with prefill chunks: one program per sequence loops over its tiles."""
    specs, prefixes = CASES["groups-mixed"]
    b = build(specs, prefixes, g=4, dim=32, block=16, seed=8)
    check_paged(b, own_only=True, tol=_device_tol(torch.float32), max_q_len=1)


@pytest.mark.parametrize("name", ["groups-decode", "groups-mixed", "groups-prefill", "mixed"])
def test_two_level_attention(name: str) -> None:
    specs, prefixes = CASES[name]
    b = build(specs, prefixes, g=4, dim=32, block=16, seed=4, pad_tokens=2, pad_seqs=1, pad_groups=1)
    check_two_level(b, tol=_device_tol(torch.float32))


@pytest.mark.parametrize(("g", "block", "own_splits", "prefix_splits"), [(1, 32, 2, 3), (4, 16, 3, 2)])
def test_two_level_attention_splits(g: int, block: int, own_splits: int, prefix_splits: int) -> None:
    specs = [(70, 1, 0), (66, 1, 0), (100, 5, 0), (40, 1, -1), (130, 1, 1)]
    b = build(specs, [64, 96], g=g, dim=32, block=block, seed=5, pad_tokens=1)
    check_two_level(b, tol=_device_tol(torch.float32), own_splits=own_splits, prefix_splits=prefix_splits)


def test_two_level_attention_mixed_program_order() -> None:
    """Prefix programs spread among the own programs (CONFIG_OVERRIDE mix) give the same result."""
    specs, prefixes = CASES["groups-decode"]
    b = build(specs, prefixes, g=4, dim=32, block=16, seed=14, pad_seqs=1)
    pa.CONFIG_OVERRIDE["mix"] = 2
    try:
        check_two_level(b, tol=_device_tol(torch.float32), prefix_splits=2)
    finally:
        pa.CONFIG_OVERRIDE.pop("mix")


@pytest.mark.parametrize("separate", [0, 1])
@pytest.mark.parametrize("name", ["groups-decode", "groups-mixed"])
def test_two_level_attention_levels_fused_or_separate(name: str, separate: int) -> None:
    """Both levels in one launch, or as two launches (prefix-only, then own-only writing the slots after
    the prefix's, on two streams on CUDA) and one reduce: the same result either way."""
    specs, prefixes = CASES[name]
    b = build(specs, prefixes, g=4, dim=32, block=16, seed=15, pad_tokens=1, pad_seqs=1, pad_groups=1)
    pa.CONFIG_OVERRIDE["separate"] = separate
    try:
        check_two_level(b, tol=_device_tol(torch.float32))
        check_two_level(b, tol=_device_tol(torch.float32), own_splits=2, prefix_splits=3)
        check_two_level(
            b, tol=_device_tol(torch.float32), own_splits=1, prefix_splits=3
        )  # own: slot 3 direct
    finally:
        pa.CONFIG_OVERRIDE.pop("separate")


def test_two_level_matches_the_torch_reference() -> None:
    """Same conventions as batchllm/kernels/attention.py's torch_attention (AttentionMeta / GroupSpan)."""
    from batchllm.kernels import AttentionMeta, GroupSpan
    from batchllm.kernels.attention import torch_attention

    specs = [(50, 1, 0), (41, 1, 0), (47, 9, 0), (29, 3, -1), (80, 1, 1), (64, 1, 1)]
    prefixes = [32, 48]
    b = build(specs, prefixes, g=4, dim=32, block=16, seed=6)
    meta = AttentionMeta(
        slot_mapping=torch.zeros(b.q.shape[0], dtype=torch.int64, device=b.q.device),
        cu_seqlens_q=b.cu_q,
        kv_lens=b.kv_lens,
        block_tables=b.tables,
        groups=(GroupSpan(0, 3, 32), GroupSpan(4, 6, 48)),
        q_lens_host=[n for _, n, _ in b.specs],
        kv_lens_host=[kv for kv, _, _ in b.specs],
    )
    ref = torch_attention(b.q, b.k_cache, b.v_cache, meta, b.scale)
    # the plain sequence between the groups is a span with prefix 0
    assert b.spans == [(0, 11, 32), (11, 14, 0), (14, 16, 48)]
    out, _ = pa.two_level_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        b.cu_q,
        b.kv_lens,
        b.tables,
        b.prefix_lens,
        b.cu_g,
        b.g_lens,
        b.g_tables,
        b.scale,
        b.max_q_len,
    )
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_half_precision_two_level() -> None:
    """bf16 on CUDA; fp16 in the interpreter (its tl.dot reads bf16 bits as integers)."""
    dtype = torch.bfloat16 if CUDA else torch.float16
    specs, prefixes = CASES["groups-mixed"]
    b = build(specs, prefixes, g=4, dim=32, block=16, dtype=dtype, seed=7)
    check_two_level(b, tol=_device_tol(dtype))


def test_store_kv() -> None:
    gen = torch.Generator().manual_seed(8)
    kv_heads, dim, block, num_blocks = 2, 32, 16, 6
    qkv = torch.randn(7, (4 + 2 * kv_heads) * dim, generator=gen).to(DEVICE)
    k = qkv[:, 4 * dim : (4 + kv_heads) * dim].view(7, kv_heads, dim)  # strided views, as from a fused qkv
    v = qkv[:, (4 + kv_heads) * dim :].view(7, kv_heads, dim)
    slots = torch.tensor([5, 17, -1, 95, 0, -1, 40], dtype=torch.int64, device=DEVICE)
    k_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=gen).to(DEVICE)
    v_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=gen).to(DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    from batchllm.kernels import store_kvcache

    store_kvcache(k[keep], v[keep], ref_k, ref_v, slots[keep])
    pa.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    # int32 slots and a half-precision cache (the interpreter rounds to bf16 by truncation: fp16 there)
    half = torch.bfloat16 if CUDA else torch.float16
    kb, vb = k_cache.to(half), v_cache.to(half)
    pa.store_kv(k, v, kb, vb, slots.int())
    assert torch.equal(kb, ref_k.to(half)) and torch.equal(vb, ref_v.to(half))


def test_merge_attention() -> None:
    gen = torch.Generator().manual_seed(9)
    o1, o2 = torch.randn(2, 5, 6, 32, generator=gen).to(DEVICE).unbind(0)
    lse1, lse2 = (torch.randn(2, 5, 6, generator=gen) * 3).to(DEVICE).unbind(0)
    lse1[0, :2] = -math.inf  # one side empty
    lse2[1, 3] = -math.inf
    lse1[2, 4] = lse2[2, 4] = -math.inf  # both empty: 0 and -inf
    o1[0, :2] = float("nan")  # an empty side's values are never read
    w1, w2 = torch.exp(lse1), torch.exp(lse2)
    ref = (torch.nan_to_num(o1) * w1[..., None] + o2 * w2[..., None]) / (w1 + w2).clamp(min=1e-30)[..., None]
    ref_lse = torch.logaddexp(lse1, lse2)
    lse_out = torch.full_like(lse1, float("nan"))
    out = pa.merge_attention(o1, lse1, o2, lse2, out=o1, lse_out=lse_out)  # in place into o1
    assert out is o1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_out, ref_lse)
    assert torch.all(out[2, 4] == 0)


# --------------------------------------------------------------------------- GPU, real sizes

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _decode_shape(groups: int, members: int, prefix: int, own: int, *, seed: int, chunk: int = 0) -> Batch:
    """groups x members decode rows (one member per group a prefill chunk of `chunk` when > 0), plus 3 plain seqs."""
    specs, prefixes = [], []
    for grp in range(groups):
        prefixes.append(prefix)
        for m in range(members):
            q_len = chunk if (chunk and m == 0) else 1
            specs.append((prefix + own + 7 * m + grp, q_len, grp))
    specs += [(prefix + own, 1, -1), (300, 300, -1), (prefix + 33, 1, -1)]
    return build(specs, prefixes, kv_heads=8, g=4, dim=128, block=16, dtype=torch.bfloat16, seed=seed)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("chunk", [0, 40])
@pytest.mark.parametrize("case", ["two_level", "paged", "prefix"])
def test_gpu_real_sizes(case: str, chunk: int) -> None:
    b = _decode_shape(12, 16, 512, 96, seed=10, chunk=chunk)
    if case == "two_level":
        check_two_level(b, tol=2e-2)
    elif case == "paged":
        check_paged(b, own_only=False, tol=2e-2)
        check_paged(b, own_only=True, tol=2e-2)
    else:
        check_prefix(b, tol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_members_prefill() -> None:
    """Scoring's shape: every member prefills a 150-token suffix against its group's 1,024-token prefix
    (256-row prefix tiles), beside a plain chunk."""
    specs = [(1024 + 150 + m, 150, grp) for grp in range(3) for m in range(6)] + [(400, 200, -1)]
    b = build(specs, [1024] * 3, kv_heads=8, g=4, dim=128, block=16, dtype=torch.bfloat16, seed=12)
    check_two_level(b, tol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_long_causal_prefill() -> None:
    """Group prefixes and long prompts: 256-row own tiles with 16 warps, one of them after cached keys."""
    specs = [(1200, 1200, -1), (900, 700, -1), (520, 512, -1)]
    b = build(specs, [], kv_heads=8, g=4, dim=128, block=16, dtype=torch.bfloat16, seed=18)
    check_paged(b, own_only=True, tol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_few_long_sequences_split() -> None:
    """Few groups and few long decodes: the launcher splits the keys on its own."""
    b = _decode_shape(1, 4, 2048, 1500, seed=11)
    check_two_level(b, tol=2e-2)
    check_paged(b, own_only=False, tol=2e-2)
    check_prefix(b, tol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_replay() -> None:
    """Captured once, replayed on new metadata of the same shapes (padded batch): same results."""
    b1 = _decode_shape(6, 16, 256, 64, seed=12)
    b2 = _decode_shape(6, 16, 320, 48, seed=13)
    assert b1.q.shape == b2.q.shape and b1.tables.shape[0] == b2.tables.shape[0]
    width = max(b1.tables.shape[1], b2.tables.shape[1])
    g_width = max(b1.g_tables.shape[1], b2.g_tables.shape[1])
    pool = max(b1.k_cache.shape[0], b2.k_cache.shape[0])

    def padded(t, w):
        return torch.nn.functional.pad(t, (0, w - t.shape[1]), value=-1)

    static = {
        "q": b1.q.clone(),
        "k": torch.zeros(pool, *b1.k_cache.shape[1:], dtype=b1.k_cache.dtype, device="cuda"),
        "v": torch.zeros(pool, *b1.v_cache.shape[1:], dtype=b1.v_cache.dtype, device="cuda"),
        "cu_q": b1.cu_q.clone(),
        "kv": b1.kv_lens.clone(),
        "tab": padded(b1.tables, width),
        "pl": b1.prefix_lens.clone(),
        "cu_g": b1.cu_g.clone(),
        "gl": b1.g_lens.clone(),
        "gtab": padded(b1.g_tables, g_width),
    }

    def load(b: Batch) -> None:
        static["q"].copy_(b.q)
        static["k"][: b.k_cache.shape[0]].copy_(b.k_cache)
        static["v"][: b.v_cache.shape[0]].copy_(b.v_cache)
        for key, src in (("cu_q", b.cu_q), ("kv", b.kv_lens), ("pl", b.prefix_lens), ("cu_g", b.cu_g)):
            static[key].copy_(src)
        static["gl"].copy_(b.g_lens)
        static["tab"].copy_(padded(b.tables, width))
        static["gtab"].copy_(padded(b.g_tables, g_width))

    out = torch.empty_like(b1.q)
    lse = torch.empty(b1.q.shape[:2], dtype=torch.float32, device="cuda")
    workspace: dict = {}

    def run() -> None:
        pa.two_level_attention(
            static["q"],
            static["k"],
            static["v"],
            static["cu_q"],
            static["kv"],
            static["tab"],
            static["pl"],
            static["cu_g"],
            static["gl"],
            static["gtab"],
            b1.scale,
            1,
            max_group_rows=16,
            out=out,
            lse=lse,
            workspace=workspace,
        )

    load(b1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile and allocate the workspace outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for b in (b2, b1):
        load(b)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, (kv_len, q_len, _) in enumerate(b.specs):
            rows = slice(int(b.cu_q[i]), int(b.cu_q[i]) + q_len)
            _close(out[rows], lse[rows], *dense(b, i, 0, kv_len, causal=True), 2e-2)


def test_reduce_reads_slots_past_two_to_the_31() -> None:
    """The reduce's slot offsets are 64-bit: slots x a slot's stride passes 2^31 elements in a big
    prefill step with many key splits (16,384 tokens x 32 heads x 128 with 33 slots). Only slot 2
    holds keys; the untouched rest of the workspace is never read."""
    from batchllm.kernels.paged.fused import _reduce_kernel

    dim, slot = 64, 1 << 30  # slot 2 starts at 2^31 elements
    po = torch.empty(2 * slot + dim, dtype=torch.float16, device=DEVICE)  # 4 GiB, never written but here
    po[2 * slot :] = 1.0
    pl = torch.tensor([-math.inf, -math.inf, 0.0], device=DEVICE)
    out, lse = torch.full((1, 1, dim), math.nan, device=DEVICE), torch.full((1, 1), math.nan, device=DEVICE)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    _reduce_kernel[(1, 1)](
        po, pl, out, lse, cu, 0, cu, 1, 1, slot, dim, dim, 1, 1, 1, dim, dim, 1, 1, 0, 3,
        BLOCK_H=1, BLOCK_D=dim, HEAD_DIM=dim, STORE_LSE=True,
    )  # fmt: skip
    assert torch.equal(out, torch.ones_like(out)) and lse.item() == 0.0


def test_rows_before_the_first_sequence_are_left_alone_with_splits() -> None:
    """Rows before cu_seqlens_q[0] belong to no sequence: unsplit, nothing is written there; split, the
    reduce writes them as rows without keys (o 0, lse -inf), never a stale workspace slot."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 64, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, 1, 8, 64, generator=gen).to(DEVICE) for _ in range(2))
    cu = torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)
    kv = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    tables = torch.tensor([[1, 0]], dtype=torch.int32, device=DEVICE)
    rows = []
    workspace = {"attn_partial_o": torch.full((10000,), 5.0, device=DEVICE)}
    workspace["attn_partial_lse"] = torch.full((10000,), 3.0, device=DEVICE)
    for splits, want in ((1, (7.0, 7.0)), (2, (0.0, -math.inf))):
        out, lse = torch.full_like(q, 7.0), torch.full((3, 2), 7.0, device=DEVICE)
        pa.paged_attention(
            q, k, v, cu, kv, tables, None, 0.125, 2, num_splits=splits, out=out, lse=lse, workspace=workspace
        )
        assert bool((out[0] == want[0]).all()) and bool((lse[0] == want[1]).all()), (splits, out[0], lse[0])
        rows.append(out[1:])
    torch.testing.assert_close(rows[0], rows[1])


def test_index_tensors_shorter_than_their_offsets_are_refused() -> None:
    q = torch.zeros(3, 2, 64, device=DEVICE)
    k = v = torch.zeros(2, 1, 8, 64, device=DEVICE)
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    kv = torch.tensor([5, 5, 5], dtype=torch.int32, device=DEVICE)
    tables = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="an index tensor of 2 rows for 3 sequences"):
        pa.paged_attention(q, k, v, cu, kv[:2], tables, None, 0.125, 2)
    with pytest.raises(ValueError, match="an index tensor of 2 rows for 3 sequences"):
        pa.paged_attention(q, k, v, cu, kv, tables[:2], None, 0.125, 2)
    with pytest.raises(ValueError, match="an index tensor of 1 rows for 3 sequences"):
        pa.paged_attention(q, k, v, cu, kv, tables, kv[:1], 0.125, 2)
