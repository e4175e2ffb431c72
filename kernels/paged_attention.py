"""Triton kernels for paged attention with two-level (shared-prefix) attention.

Layout (the same as kernels/attention.py, the torch reference):

- q [num_tokens, num_heads, head_dim]: the new tokens of B sequences back to
  back; sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1], at positions
  kv_lens[i] - q_len_i .. kv_lens[i] - 1 (causal: a query sees keys at
  positions <= its own).
- k_cache, v_cache [num_blocks, num_kv_heads, block_size, head_dim], head major
  inside a block; block_tables [B, max_blocks] int32 (-1 unused);
  slot = block_id * block_size + offset.
- GQA: num_heads = num_kv_heads * g. A tile holds BLOCK_M = (query tokens) x
  (the g heads of one kv head) rows, so each K/V tile is loaded once for all g
  heads of its kv head.
- lse: natural-log log-sum-exp of the scaled scores, float32
  [num_tokens, num_heads], -inf where a row saw no key.

Kernels:

- ``store_kv``: new keys/values into their slots (slot -1 = skip).
- ``paged_attention``: each sequence's queries against its keys at positions
  [start_pos[i], kv_lens[i]), causal; ragged batches of prefill chunks and
  decode rows; split-KV (partial results + a reduce) when few tiles would not
  fill the GPU.
- ``prefix_attention``: the shared level of two-level attention: every row of
  group j attends, unmasked, to the group's prefix keys [0, prefix_len_j); the
  prefix is read once per (group, kv head, tile of up to 64 rows), not once
  per member (decode, GQA 4: 16 members x 4 heads = one tile).
- ``merge_attention``: combine two partial results through their lse.
- ``two_level_attention``: both levels in ONE launch (prefix programs first,
  then per-sequence programs), partial results into a workspace, then one
  reduce launch.

All launchers are free of host synchronisation: grids depend on tensor shapes
and host integers only, so they can be captured in a CUDA graph once the
kernels are compiled (run them once before capture).

Tiles. The inner loop (_attend_tile) walks the block table BLOCK_N keys at a
time: per key row one block-table entry, then contiguous head-major rows of
K and V (16-byte vector loads), S = Q K^T and P V with tl.dot (fp32
accumulation; exact fp32 for fp32 inputs), online softmax in base 2 with
log2(e) folded into the scale. Prefix and prefill tiles take an unmasked loop
over whole tiles and a masked one for the rest; decode tiles one masked loop.
Decode tiles (one token) take the g heads of HPT kv heads (HPT x g = 16 rows
for GQA 4 or 8) with HPT runs of keys, one per kv head, and a block-diagonal
mask: the same work as a 16-row tile of one kv head with 12 padding rows, but
HPT times the bytes per step and HPT times fewer programs.

Rows to programs. Decode batches (max_q_len <= 1) take one program per
(sequence, HPT kv heads, key split); a program loops over its sequence's row
tiles, so an understated max_q_len is slow, not wrong. Otherwise item i (a
sequence, or a group) with n_i rows from cu[i] owns the "virtual" tiles
[v(i), v(i+1)) with v(i) = (cu[i] - cu[0] + i * (BQ - 1)) // BQ, at least
ceil(n_i / BQ) of them; so (rows + items * (BQ - 1)) // BQ programs cover
every row, a program finds its item by binary search on cu, and programs past
an item's rows exit at once.

Launch heuristics (no autotuning: it is slow and breaks graph capture):
BLOCK_N 64 (128 columns for decode tiles), 4 warps, 2 pipeline stages for
memory-bound launches and 3 for prefill, key splits only when the tiles would
not fill the GPU twice over. CONFIG_OVERRIDE changes them for benchmarks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "CONFIG_OVERRIDE",
    "merge_attention",
    "paged_attention",
    "prefix_attention",
    "store_kv",
    "two_level_attention",
]

_LOG2E = 1.4426950408889634

# Tuning knobs for benchmarks (empty = the built-in heuristic). Keys: block_n,
# num_warps, num_stages, maxnreg, block_m_pre, block_m_own (rows of a tile:
# tokens x padded g), target_programs, prefix_splits, own_splits, mix (own
# programs after each prefix program in a fused launch), prefix_direct,
# block_n_pre, block_n_own, prefix_split_loop, own_split_loop, heads_per_tile.
CONFIG_OVERRIDE: dict[str, int] = {}


def _fix_interpreter_index() -> None:
    """Triton's interpreter turns a scalar into an index (loop bounds) with int() on a one-element
    array, which numpy >= 2.4 rejects; make it take the element. Only under TRITON_INTERPRET=1."""
    try:
        import triton.runtime.interpreter as interp

        original = interp._patch_lang_tensor
    except (ImportError, AttributeError):
        return
    if getattr(original, "_index_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._index_fixed = True
    interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_index()


# --------------------------------------------------------------------------- store_kv


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kch,
    stride_kco,
    stride_vcb,
    stride_vch,
    stride_vco,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
        t64 = t.to(tl.int64)
        k = tl.load(k_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        kdst = kc_ptr + blk * stride_kcb + off * stride_kco + h[:, None] * stride_kch + d[None, :]
        vdst = vc_ptr + blk * stride_vcb + off * stride_vco + h[:, None] * stride_vch + d[None, :]
        tl.store(kdst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vdst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write new keys/values [T, num_kv_heads, head_dim] at their slots; slot -1 skips the row."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,)
    assert (
        k_cache.shape == v_cache.shape and k_cache.shape[1] == num_kv_heads and k_cache.shape[3] == head_dim
    )
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    block_size = k_cache.shape[2]
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


# --------------------------------------------------------------------------- attention tiles
# The kernels call builtins of triton.language and jit functions of this module only: the library's
# own jit helpers (tl.max, tl.sum, tl.cdiv, tl.zeros) are bound to compiled or interpreted mode when
# triton is first imported, so avoiding them lets this module run interpreted on its own. Reductions
# go through tl.reduce with the library's combine functions (what tl.max / tl.sum use), which the
# interpreter recognises and evaluates with numpy; ours are the fallback should those names move.


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
_SUM = getattr(tl.standard, "_sum_combine", _add_combine)


@triton.jit
def _locate(cu_ptr, n_items, n_steps, vt, BQ: tl.constexpr):
    """(item, tile index within the item) of virtual tile vt: the last item i with v(i) <= vt."""
    base = tl.load(cu_ptr)
    lo = tl.program_id(0) * 0
    hi = lo + n_items
    for _ in range(n_steps):
        mid = (lo + hi) // 2
        v_mid = (tl.load(cu_ptr + mid) - base + mid * (BQ - 1)) // BQ
        ok = v_mid <= vt
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    v_lo = (tl.load(cu_ptr + lo) - base + lo * (BQ - 1)) // BQ
    return lo, vt - v_lo


@triton.jit
def _attend_tile(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ko,
    stride_vb,
    stride_vh,
    stride_vo,
    row0,
    n_tok,
    kvh0,
    group,
    key_lo,
    key_hi,
    qpos0,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPLIT_LOOP: tl.constexpr,
    BQ: tl.constexpr,
    HPT: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax of one row tile over keys [key_lo, key_hi) of kv heads kvh0 .. kvh0 + HPT - 1.

    Rows r = (token * HPT + c) * G_PAD + hh: query head (kvh0 + c) * group + hh
    of token t at position qpos0 + t (positions only matter when CAUSAL). With
    HPT > 1 (decode tiles, where one token's g heads fill few of the 16 rows a
    tl.dot needs) the key columns are HPT runs of BLOCK_N // HPT keys, one run
    per kv head, and a row only sees its own head's run. Returns (acc
    unnormalised, m in log2 units, l).
    """
    BM: tl.constexpr = BQ * HPT * G_PAD if BQ * HPT * G_PAD > 16 else 16  # tl.dot needs 16 rows
    BNH: tl.constexpr = BLOCK_N // HPT  # keys per kv head and step
    r = tl.arange(0, BM)
    t = r // (HPT * G_PAD)
    c_row = (r // G_PAD) % HPT
    hh = r % G_PAD
    d = tl.arange(0, BLOCK_D)
    row_ok = (t < n_tok) & (hh < group) & (kvh0 + c_row < NUM_KV_HEADS)
    d_ok = d < HEAD_DIM
    q_rows = (row0 + t).to(tl.int64) * stride_qt + ((kvh0 + c_row) * group + hh) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BM], 0.0, dtype=tl.float32)
    acc = tl.full([BM, BLOCK_D], 0.0, dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    c_col = cols // BNH  # kv head (within the tile) of each key column
    col_ok = kvh0 + c_col < NUM_KV_HEADS
    # kv-head offsets: one scalar, or one per key column when the tile spans HPT kv heads
    k_hoff = (kvh0 + c_col).to(tl.int64) * stride_kh if HPT > 1 else kvh0.to(tl.int64) * stride_kh
    v_hoff = (kvh0 + c_col).to(tl.int64) * stride_vh if HPT > 1 else kvh0.to(tl.int64) * stride_vh

    if SPLIT_LOOP:
        # keys every row of the tile sees: whole tiles need no mask at all (prefix and prefill
        # tiles; decode tiles take one loop, without a pipeline drain between two)
        all_see = tl.minimum(key_hi, qpos0 + 1) if CAUSAL else key_hi
        full_end = key_lo + tl.maximum(all_see - key_lo, 0) // BNH * BNH
    else:
        full_end = key_lo
    for start in range(key_lo, full_end, BNH):
        n = start + cols % BNH
        blk = tl.load(table_ptr + n // BLOCK_SIZE).to(tl.int64)
        off = n % BLOCK_SIZE
        k_rows = blk * stride_kb + off * stride_ko + k_hoff
        v_rows = blk * stride_vb + off * stride_vo + v_hoff
        if HEAD_DIM == BLOCK_D and HPT == 1:
            k = tl.load(k_ptr + k_rows[:, None] + d[None, :])
            v = tl.load(v_ptr + v_rows[:, None] + d[None, :])
        else:
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = s * qk_scale
        if HPT > 1:
            s = tl.where(c_row[:, None] == c_col[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # the rest (all of it without SPLIT_LOOP): a ragged end and/or the causal diagonal
    qpos = qpos0 + t
    for start in range(full_end, key_hi, BNH):
        n = start + cols % BNH
        n_ok = n < key_hi
        blk = tl.load(table_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        off = n % BLOCK_SIZE
        k_rows = blk * stride_kb + off * stride_ko + k_hoff
        v_rows = blk * stride_vb + off * stride_vo + v_hoff
        kv_mask = (n_ok & col_ok)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = s * qk_scale
        vis = n_ok[None, :] & (n[None, :] <= qpos[:, None]) if CAUSAL else n_ok[None, :]
        if HPT > 1:
            vis = vis & (c_row[:, None] == c_col[None, :])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_tile(
    acc,
    m_i,
    l_i,
    o_ptr,
    lse_ptr,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    row0,
    n_tok,
    kvh0,
    group,
    NUM_KV_HEADS: tl.constexpr,
    BQ: tl.constexpr,
    HPT: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Normalise a tile and write its rows (o in o_ptr's dtype, lse in natural log); rows as in _attend_tile."""
    BM: tl.constexpr = BQ * HPT * G_PAD if BQ * HPT * G_PAD > 16 else 16
    r = tl.arange(0, BM)
    t = r // (HPT * G_PAD)
    c_row = (r // G_PAD) % HPT
    hh = r % G_PAD
    d = tl.arange(0, BLOCK_D)
    row_ok = (t < n_tok) & (hh < group) & (kvh0 + c_row < NUM_KV_HEADS)
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    head = (kvh0 + c_row) * group + hh
    o_rows = (row0 + t).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        o_ptr + o_rows[:, None] + d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
    )
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + (row0 + t).to(tl.int64) * stride_lt + head * stride_lh, lse, mask=row_ok)


@triton.jit
def _prefix_tile(
    q_start,
    t_hi,
    g_row0,
    j,
    split,
    lo,
    hi,
    kvh,
    q_ptr,
    k_ptr,
    v_ptr,
    g_tables_ptr,
    stride_gtab,
    out_ptr,
    lse_ptr,
    po_ptr,
    pl_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ko,
    stride_vb,
    stride_vh,
    stride_vo,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    stride_pos,
    stride_pot,
    stride_poh,
    stride_pls,
    stride_plt,
    stride_plh,
    group,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr,
    DIRECT: tl.constexpr,
    BQ: tl.constexpr,
    HPT: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_LOOP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Rows [q_start, min(q_start + BQ, t_hi)) of group j: attend to keys [lo, hi) and store."""
    n_tok = tl.minimum(t_hi - q_start, BQ)
    row0 = g_row0 + q_start
    acc, m_i, l_i = _attend_tile(
        q_ptr,
        k_ptr,
        v_ptr,
        g_tables_ptr + j.to(tl.int64) * stride_gtab,
        stride_qt,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_ko,
        stride_vb,
        stride_vh,
        stride_vo,
        row0,
        n_tok,
        kvh,
        group,
        lo,
        hi,
        lo,
        qk_scale,
        NUM_KV_HEADS,
        False,
        SPLIT_LOOP,
        BQ,
        HPT,
        G_PAD,
        BLOCK_N,
        BLOCK_D,
        HEAD_DIM,
        BLOCK_SIZE,
        DOT_PRECISION,
    )
    if DIRECT:
        _store_tile(
            acc,
            m_i,
            l_i,
            out_ptr,
            lse_ptr,
            stride_ot,
            stride_oh,
            stride_lt,
            stride_lh,
            row0,
            n_tok,
            kvh,
            group,
            NUM_KV_HEADS,
            BQ,
            HPT,
            G_PAD,
            BLOCK_D,
            HEAD_DIM,
        )
    else:
        _store_tile(
            acc,
            m_i,
            l_i,
            po_ptr + split.to(tl.int64) * stride_pos,
            pl_ptr + split.to(tl.int64) * stride_pls,
            stride_pot,
            stride_poh,
            stride_plt,
            stride_plh,
            row0,
            n_tok,
            kvh,
            group,
            NUM_KV_HEADS,
            BQ,
            HPT,
            G_PAD,
            BLOCK_D,
            HEAD_DIM,
        )


@triton.jit
def _prefix_program(
    pid,
    q_ptr,
    k_ptr,
    v_ptr,
    cu_g_ptr,
    g_lens_ptr,
    g_tables_ptr,
    n_groups,
    group_steps,
    stride_gtab,
    n_pre_vt,
    out_ptr,
    lse_ptr,
    po_ptr,
    pl_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ko,
    stride_vb,
    stride_vh,
    stride_vo,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    stride_pos,
    stride_pot,
    stride_poh,
    stride_pls,
    stride_plt,
    stride_plh,
    group,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr,
    SPLITS: tl.constexpr,
    DIRECT: tl.constexpr,
    SEARCH: tl.constexpr,
    BQ: tl.constexpr,
    HPT: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_LOOP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Shared-prefix tiles of one (group, HPT kv heads, key split): the group's rows x their heads, no mask.

    SEARCH: the program is one virtual tile (found by binary search); else it
    is group `vt` and loops over the group's row tiles (one when the host's
    bound on the rows per group holds).
    """
    N_CHUNKS: tl.constexpr = (NUM_KV_HEADS + HPT - 1) // HPT
    kvh = pid % N_CHUNKS * HPT
    rest = pid // N_CHUNKS
    vt = rest % n_pre_vt
    split = rest // n_pre_vt
    if SEARCH:
        j, local = _locate(cu_g_ptr, n_groups, group_steps, vt, BQ)
    else:
        j = vt
        local = vt * 0
    g_row0 = tl.load(cu_g_ptr + j)
    n_rows = tl.load(cu_g_ptr + j + 1) - g_row0
    t_lo = local * BQ
    t_hi = tl.minimum(t_lo + BQ, n_rows) if SEARCH else n_rows
    plen = tl.load(g_lens_ptr + j)
    step = BLOCK_N // HPT
    chunk = ((plen + SPLITS - 1) // SPLITS + step - 1) // step * step
    lo = tl.minimum(split * chunk, plen)
    hi = tl.minimum(lo + chunk, plen)
    if SEARCH:
        if t_hi > t_lo:
            _prefix_tile(
                t_lo,
                t_hi,
                g_row0,
                j,
                split,
                lo,
                hi,
                kvh,
                q_ptr,
                k_ptr,
                v_ptr,
                g_tables_ptr,
                stride_gtab,
                out_ptr,
                lse_ptr,
                po_ptr,
                pl_ptr,
                stride_qt,
                stride_qh,
                stride_kb,
                stride_kh,
                stride_ko,
                stride_vb,
                stride_vh,
                stride_vo,
                stride_ot,
                stride_oh,
                stride_lt,
                stride_lh,
                stride_pos,
                stride_pot,
                stride_poh,
                stride_pls,
                stride_plt,
                stride_plh,
                group,
                qk_scale,
                NUM_KV_HEADS,
                DIRECT,
                BQ,
                HPT,
                G_PAD,
                BLOCK_N,
                SPLIT_LOOP,
                BLOCK_D,
                HEAD_DIM,
                BLOCK_SIZE,
                DOT_PRECISION,
            )
    else:
        for q_start in range(t_lo, t_hi, BQ):
            _prefix_tile(
                q_start,
                t_hi,
                g_row0,
                j,
                split,
                lo,
                hi,
                kvh,
                q_ptr,
                k_ptr,
                v_ptr,
                g_tables_ptr,
                stride_gtab,
                out_ptr,
                lse_ptr,
                po_ptr,
                pl_ptr,
                stride_qt,
                stride_qh,
                stride_kb,
                stride_kh,
                stride_ko,
                stride_vb,
                stride_vh,
                stride_vo,
                stride_ot,
                stride_oh,
                stride_lt,
                stride_lh,
                stride_pos,
                stride_pot,
                stride_poh,
                stride_pls,
                stride_plt,
                stride_plh,
                group,
                qk_scale,
                NUM_KV_HEADS,
                DIRECT,
                BQ,
                HPT,
                G_PAD,
                BLOCK_N,
                SPLIT_LOOP,
                BLOCK_D,
                HEAD_DIM,
                BLOCK_SIZE,
                DOT_PRECISION,
            )


@triton.jit
def _own_tile(
    i,
    q_start,
    t_hi,
    s_row0,
    q_len,
    kv_len,
    first,
    split,
    kvh,
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    stride_tab,
    out_ptr,
    lse_ptr,
    po_ptr,
    pl_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ko,
    stride_vb,
    stride_vh,
    stride_vo,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    stride_pos,
    stride_pot,
    stride_poh,
    stride_pls,
    stride_plt,
    stride_plh,
    group,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr,
    SPLITS: tl.constexpr,
    SLOT0: tl.constexpr,
    DIRECT: tl.constexpr,
    BQ: tl.constexpr,
    HPT: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_LOOP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Rows [q_start, min(q_start + BQ, t_hi)) of a sequence: attend to its keys of split `split` and store."""
    n_tok = tl.minimum(t_hi - q_start, BQ)
    qpos0 = kv_len - q_len + q_start
    end = qpos0 + n_tok  # keys past the tile's last query are never visible
    span = tl.maximum(end - first, 0)
    step = BLOCK_N // HPT
    chunk = ((span + SPLITS - 1) // SPLITS + step - 1) // step * step
    lo = tl.minimum(first + split * chunk, end)
    hi = tl.minimum(lo + chunk, end)
    row0 = s_row0 + q_start
    acc, m_i, l_i = _attend_tile(
        q_ptr,
        k_ptr,
        v_ptr,
        tables_ptr + i.to(tl.int64) * stride_tab,
        stride_qt,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_ko,
        stride_vb,
        stride_vh,
        stride_vo,
        row0,
        n_tok,
        kvh,
        group,
        lo,
        hi,
        qpos0,
        qk_scale,
        NUM_KV_HEADS,
        True,
        SPLIT_LOOP,
        BQ,
        HPT,
        G_PAD,
        BLOCK_N,
        BLOCK_D,
        HEAD_DIM,
        BLOCK_SIZE,
        DOT_PRECISION,
    )
    if DIRECT:
        _store_tile(
            acc,
            m_i,
            l_i,
            out_ptr,
            lse_ptr,
            stride_ot,
            stride_oh,
            stride_lt,
            stride_lh,
            row0,
            n_tok,
            kvh,
            group,
            NUM_KV_HEADS,
            BQ,
            HPT,
            G_PAD,
            BLOCK_D,
            HEAD_DIM,
        )
    else:
        slot = split + SLOT0
        _store_tile(
            acc,
            m_i,
            l_i,
            po_ptr + slot.to(tl.int64) * stride_pos,
            pl_ptr + slot.to(tl.int64) * stride_pls,
            stride_pot,
            stride_poh,
            stride_plt,
            stride_plh,
            row0,
            n_tok,
            kvh,
            group,
            NUM_KV_HEADS,
            BQ,
            HPT,
            G_PAD,
            BLOCK_D,
            HEAD_DIM,
        )


@triton.jit
def _own_program(
    pid,
    q_ptr,
    k_ptr,
    v_ptr,
    cu_q_ptr,
    kv_lens_ptr,
    start_ptr,
    tables_ptr,
    n_seqs,
    seq_steps,
    stride_tab,
    n_own_vt,
    out_ptr,
    lse_ptr,
    po_ptr,
    pl_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ko,
    stride_vb,
    stride_vh,
    stride_vo,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    stride_pos,
    stride_pot,
    stride_poh,
    stride_pls,
    stride_plt,
    stride_plh,
    group,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr,
    HAS_START: tl.constexpr,
    SPLITS: tl.constexpr,
    SLOT0: tl.constexpr,
    DIRECT: tl.constexpr,
    SEARCH: tl.constexpr,
    BQ: tl.constexpr,
    HPT: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_LOOP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Own-level tiles of one (sequence, HPT kv heads, key split): BQ query tokens x their heads, causal.

    SEARCH: the program is one virtual tile (found by binary search); else it
    is sequence `vt` and loops over its row tiles (one when max_q_len holds).
    """
    N_CHUNKS: tl.constexpr = (NUM_KV_HEADS + HPT - 1) // HPT
    kvh = pid % N_CHUNKS * HPT
    rest = pid // N_CHUNKS
    vt = rest % n_own_vt
    split = rest // n_own_vt
    if SEARCH:
        i, local = _locate(cu_q_ptr, n_seqs, seq_steps, vt, BQ)
    else:
        i = vt
        local = vt * 0
    s_row0 = tl.load(cu_q_ptr + i)
    q_len = tl.load(cu_q_ptr + i + 1) - s_row0
    t_lo = local * BQ
    t_hi = tl.minimum(t_lo + BQ, q_len) if SEARCH else q_len
    kv_len = tl.load(kv_lens_ptr + i)
    first = tl.load(start_ptr + i) if HAS_START else kv_len * 0
    if SEARCH:
        if t_hi > t_lo:
            _own_tile(
                i,
                t_lo,
                t_hi,
                s_row0,
                q_len,
                kv_len,
                first,
                split,
                kvh,
                q_ptr,
                k_ptr,
                v_ptr,
                tables_ptr,
                stride_tab,
                out_ptr,
                lse_ptr,
                po_ptr,
                pl_ptr,
                stride_qt,
                stride_qh,
                stride_kb,
                stride_kh,
                stride_ko,
                stride_vb,
                stride_vh,
                stride_vo,
                stride_ot,
                stride_oh,
                stride_lt,
                stride_lh,
                stride_pos,
                stride_pot,
                stride_poh,
                stride_pls,
                stride_plt,
                stride_plh,
                group,
                qk_scale,
                NUM_KV_HEADS,
                SPLITS,
                SLOT0,
                DIRECT,
                BQ,
                HPT,
                G_PAD,
                BLOCK_N,
                SPLIT_LOOP,
                BLOCK_D,
                HEAD_DIM,
                BLOCK_SIZE,
                DOT_PRECISION,
            )
    else:
        for q_start in range(t_lo, t_hi, BQ):
            _own_tile(
                i,
                q_start,
                t_hi,
                s_row0,
                q_len,
                kv_len,
                first,
                split,
                kvh,
                q_ptr,
                k_ptr,
                v_ptr,
                tables_ptr,
                stride_tab,
                out_ptr,
                lse_ptr,
                po_ptr,
                pl_ptr,
                stride_qt,
                stride_qh,
                stride_kb,
                stride_kh,
                stride_ko,
                stride_vb,
                stride_vh,
                stride_vo,
                stride_ot,
                stride_oh,
                stride_lt,
                stride_lh,
                stride_pos,
                stride_pot,
                stride_poh,
                stride_pls,
                stride_plt,
                stride_plh,
                group,
                qk_scale,
                NUM_KV_HEADS,
                SPLITS,
                SLOT0,
                DIRECT,
                BQ,
                HPT,
                G_PAD,
                BLOCK_N,
                SPLIT_LOOP,
                BLOCK_D,
                HEAD_DIM,
                BLOCK_SIZE,
                DOT_PRECISION,
            )


@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cu_q_ptr,
    kv_lens_ptr,
    start_ptr,
    tables_ptr,
    n_seqs,
    seq_steps,
    stride_tab,
    n_own_vt,
    cu_g_ptr,
    g_lens_ptr,
    g_tables_ptr,
    n_groups,
    group_steps,
    stride_gtab,
    n_pre_vt,
    mix,
    out_ptr,
    lse_ptr,
    po_ptr,
    pl_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ko,
    stride_vb,
    stride_vh,
    stride_vo,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    stride_pos,
    stride_pot,
    stride_poh,
    stride_pls,
    stride_plt,
    stride_plh,
    group,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr,
    HAS_PRE: tl.constexpr,
    HAS_OWN: tl.constexpr,
    HAS_START: tl.constexpr,
    PRE_SPLITS: tl.constexpr,
    OWN_SPLITS: tl.constexpr,
    DIRECT: tl.constexpr,
    SEARCH_PRE: tl.constexpr,
    SEARCH_OWN: tl.constexpr,
    BQ_PRE: tl.constexpr,
    HPT_PRE: tl.constexpr,
    BQ_OWN: tl.constexpr,
    HPT_OWN: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_N_PRE: tl.constexpr,
    BLOCK_N_OWN: tl.constexpr,
    SPLIT_LOOP_PRE: tl.constexpr,
    SPLIT_LOOP_OWN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Shared-prefix programs and own-level programs (both when fused): prefix program k is
    pid k * (mix + 1), the own programs fill the pids between and after them.

    Within a level: kv heads fastest, then row tile (or item), then key split.
    DIRECT (one level, one split) writes out/lse; otherwise split s of the
    prefix writes workspace slot s and split s of the own level slot
    PRE_SPLITS + s, and _reduce_kernel combines them.
    """
    pid = tl.program_id(0)
    if HAS_PRE:
        # prefix program k sits at pid k * (mix + 1): mix own programs follow each prefix program
        n_pre = n_pre_vt * (((NUM_KV_HEADS + HPT_PRE - 1) // HPT_PRE) * PRE_SPLITS)
        period = mix + 1
        if (pid % period == 0) & (pid // period < n_pre):
            _prefix_program(
                pid // period,
                q_ptr,
                k_ptr,
                v_ptr,
                cu_g_ptr,
                g_lens_ptr,
                g_tables_ptr,
                n_groups,
                group_steps,
                stride_gtab,
                n_pre_vt,
                out_ptr,
                lse_ptr,
                po_ptr,
                pl_ptr,
                stride_qt,
                stride_qh,
                stride_kb,
                stride_kh,
                stride_ko,
                stride_vb,
                stride_vh,
                stride_vo,
                stride_ot,
                stride_oh,
                stride_lt,
                stride_lh,
                stride_pos,
                stride_pot,
                stride_poh,
                stride_pls,
                stride_plt,
                stride_plh,
                group,
                qk_scale,
                NUM_KV_HEADS,
                PRE_SPLITS,
                DIRECT,
                SEARCH_PRE,
                BQ_PRE,
                HPT_PRE,
                G_PAD,
                BLOCK_N_PRE,
                SPLIT_LOOP_PRE,
                BLOCK_D,
                HEAD_DIM,
                BLOCK_SIZE,
                DOT_PRECISION,
            )
        elif HAS_OWN:
            _own_program(
                pid - tl.minimum(n_pre, (pid + mix) // period),
                q_ptr,
                k_ptr,
                v_ptr,
                cu_q_ptr,
                kv_lens_ptr,
                start_ptr,
                tables_ptr,
                n_seqs,
                seq_steps,
                stride_tab,
                n_own_vt,
                out_ptr,
                lse_ptr,
                po_ptr,
                pl_ptr,
                stride_qt,
                stride_qh,
                stride_kb,
                stride_kh,
                stride_ko,
                stride_vb,
                stride_vh,
                stride_vo,
                stride_ot,
                stride_oh,
                stride_lt,
                stride_lh,
                stride_pos,
                stride_pot,
                stride_poh,
                stride_pls,
                stride_plt,
                stride_plh,
                group,
                qk_scale,
                NUM_KV_HEADS,
                HAS_START,
                OWN_SPLITS,
                PRE_SPLITS,
                DIRECT,
                SEARCH_OWN,
                BQ_OWN,
                HPT_OWN,
                G_PAD,
                BLOCK_N_OWN,
                SPLIT_LOOP_OWN,
                BLOCK_D,
                HEAD_DIM,
                BLOCK_SIZE,
                DOT_PRECISION,
            )
    else:
        _own_program(
            pid,
            q_ptr,
            k_ptr,
            v_ptr,
            cu_q_ptr,
            kv_lens_ptr,
            start_ptr,
            tables_ptr,
            n_seqs,
            seq_steps,
            stride_tab,
            n_own_vt,
            out_ptr,
            lse_ptr,
            po_ptr,
            pl_ptr,
            stride_qt,
            stride_qh,
            stride_kb,
            stride_kh,
            stride_ko,
            stride_vb,
            stride_vh,
            stride_vo,
            stride_ot,
            stride_oh,
            stride_lt,
            stride_lh,
            stride_pos,
            stride_pot,
            stride_poh,
            stride_pls,
            stride_plt,
            stride_plh,
            group,
            qk_scale,
            NUM_KV_HEADS,
            HAS_START,
            OWN_SPLITS,
            0,
            DIRECT,
            SEARCH_OWN,
            BQ_OWN,
            HPT_OWN,
            G_PAD,
            BLOCK_N_OWN,
            SPLIT_LOOP_OWN,
            BLOCK_D,
            HEAD_DIM,
            BLOCK_SIZE,
            DOT_PRECISION,
        )


@triton.jit
def _reduce_kernel(
    po_ptr,
    pl_ptr,
    out_ptr,
    lse_ptr,
    cu_g_ptr,
    n_groups,
    cu_q_ptr,
    n_seqs,
    num_heads,
    stride_pos,
    stride_pot,
    stride_poh,
    stride_pls,
    stride_plt,
    stride_plh,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    PRE_SLOTS: tl.constexpr,
    OWN_SLOTS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """Combine a row's partial results: prefix slots (rows of groups) and own slots (rows of sequences).

    Rows in neither get o = 0, lse = -inf.
    """
    row = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < num_heads
    d_ok = d < HEAD_DIM
    row64 = row.to(tl.int64)
    in_pre = row < 0
    in_own = row < 0
    if PRE_SLOTS > 0:
        in_pre = (row >= tl.load(cu_g_ptr)) & (row < tl.load(cu_g_ptr + n_groups))
    if OWN_SLOTS > 0:
        in_own = row < tl.load(cu_q_ptr + n_seqs)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_sum = tl.full([BLOCK_H], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_D], 0.0, dtype=tl.float32)
    for s in tl.static_range(PRE_SLOTS + OWN_SLOTS):
        valid = in_pre if s < PRE_SLOTS else in_own
        ls = tl.load(
            pl_ptr + s * stride_pls + row64 * stride_plt + h * stride_plh,
            mask=h_ok & valid,
            other=float("-inf"),
        )
        has = ls > float("-inf")
        o = tl.load(
            po_ptr + s * stride_pos + row64 * stride_pot + h[:, None] * stride_poh + d[None, :],
            mask=has[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        m_new = tl.maximum(m, ls)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        w = tl.exp(ls - m_use)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_sum = l_sum * alpha + w
        m = m_new
    seen = l_sum > 0.0
    o = acc / tl.where(seen, l_sum, 1.0)[:, None]
    tl.store(
        out_ptr + row64 * stride_ot + h[:, None] * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=h_ok[:, None] & d_ok[None, :],
    )
    if STORE_LSE:
        lse = tl.where(seen, m + tl.log(tl.where(seen, l_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + row64 * stride_lt + h * stride_lh, lse, mask=h_ok)


@triton.jit
def _merge_kernel(
    o1_ptr,
    l1_ptr,
    o2_ptr,
    l2_ptr,
    out_ptr,
    lse_ptr,
    num_heads,
    stride_o1t,
    stride_o1h,
    stride_l1t,
    stride_l1h,
    stride_o2t,
    stride_o2h,
    stride_l2t,
    stride_l2h,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < num_heads
    mask = h_ok[:, None] & (d[None, :] < HEAD_DIM)
    l1 = tl.load(l1_ptr + row * stride_l1t + h * stride_l1h, mask=h_ok, other=float("-inf"))
    l2 = tl.load(l2_ptr + row * stride_l2t + h * stride_l2h, mask=h_ok, other=float("-inf"))
    m = tl.maximum(l1, l2)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w1 = tl.exp(l1 - m_use)
    w2 = tl.exp(l2 - m_use)
    o1 = tl.load(
        o1_ptr + row * stride_o1t + h[:, None] * stride_o1h + d[None, :], mask=mask & (w1 > 0)[:, None]
    )
    o2 = tl.load(
        o2_ptr + row * stride_o2t + h[:, None] * stride_o2h + d[None, :], mask=mask & (w2 > 0)[:, None]
    )
    o1 = tl.where((w1 > 0)[:, None], o1.to(tl.float32), 0.0)
    o2 = tl.where((w2 > 0)[:, None], o2.to(tl.float32), 0.0)
    total = w1 + w2
    seen = total > 0.0
    o = (o1 * w1[:, None] + o2 * w2[:, None]) / tl.where(seen, total, 1.0)[:, None]
    tl.store(
        out_ptr + row * stride_ot + h[:, None] * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=mask,
    )
    if STORE_LSE:
        lse = tl.where(seen, m_use + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        tl.store(lse_ptr + row * stride_lt + h * stride_lh, lse, mask=h_ok)


# --------------------------------------------------------------------------- launch configuration

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small, so that tests exercise the split paths
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _num_stages(device: torch.device, prefill: bool) -> int:
    """2 for memory-bound launches (decode, shared prefix: measured best on H200), 3 for prefill
    tiles on parts with 200+ KB of shared memory (A100/H100/H200/B200)."""
    if "num_stages" in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE["num_stages"]
    if device.type != "cuda":
        return 1
    major, minor = torch.cuda.get_device_capability(device)
    return 3 if prefill and (major, minor) in ((8, 0), (9, 0), (10, 0)) else 2


def _block_n(head_dim: int) -> int:
    if "block_n" in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE["block_n"]
    return 32 if head_dim > 128 else 64


def _rows_pre(g_pad: int, head_dim: int, max_group_rows: int | None) -> int:
    """Query tokens per shared-prefix tile: rows = tokens x g_pad, 16..64."""
    if "block_m_pre" in CONFIG_OVERRIDE:
        return max(1, CONFIG_OVERRIDE["block_m_pre"] // g_pad)
    # 64 rows at most: a 128-row tile would need 8 warps, which the own-level tiles of a fused
    # launch (same kernel, same warps) take badly; bigger groups take several tiles, adjacent
    # programs, so their prefix is read from L2 after the first
    rows = 64 if max_group_rows is None else triton.next_power_of_2(max(1, max_group_rows)) * g_pad
    rows = min(max(rows, 16), 64)
    return max(1, rows // g_pad)


def _rows_own(g_pad: int, head_dim: int, max_q_len: int) -> int:
    """Query tokens per own-level tile: one for decode-only batches, else 64 or 128 rows."""
    if "block_m_own" in CONFIG_OVERRIDE:
        return max(1, CONFIG_OVERRIDE["block_m_own"] // g_pad)
    if max_q_len <= 1:
        return 1
    rows = 128 if max_q_len * g_pad >= 256 and head_dim <= 128 else 64
    rows = min(rows, max(16, triton.next_power_of_2(max_q_len) * g_pad))
    return max(1, rows // g_pad)


def _splits(tiles: int, max_keys: int, device: torch.device, min_chunk: int) -> int:
    """Key splits so that `tiles` work items fill the device (>= min_chunk keys per split)."""
    target = CONFIG_OVERRIDE.get("target_programs", 2 * _sm_count(device))
    if tiles >= target or max_keys <= min_chunk:
        return 1
    return max(1, min(triton.cdiv(target, max(tiles, 1)), triton.cdiv(max_keys, min_chunk), 32))


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    num_heads, head_dim = q.shape[1], q.shape[2]
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "caches are [blocks, kv_heads, block, dim]"
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    return num_kv_heads, num_heads // num_kv_heads, block_size


def _workspace(
    workspace: dict | None, slots: int, q: torch.Tensor, num_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial results [slots, T, H, D] (q's dtype) and lse [slots, T, H] float32, reused from `workspace`."""
    num_tokens = q.shape[0]
    n_o, n_l = slots * num_tokens * num_heads * head_dim, slots * num_tokens * num_heads
    if workspace is None:
        workspace = {}
    # partial outputs in q's dtype (bf16/fp16 halve the traffic; they are normalised, as the output is)
    po, pl = workspace.get("attn_partial_o"), workspace.get("attn_partial_lse")
    if po is None or po.numel() < n_o or po.device != q.device or po.dtype != q.dtype:
        po = torch.empty(n_o, dtype=q.dtype, device=q.device)
        workspace["attn_partial_o"] = po
    if pl is None or pl.numel() < n_l or pl.device != q.device:
        pl = torch.empty(n_l, dtype=torch.float32, device=q.device)
        workspace["attn_partial_lse"] = pl
    return (
        po[:n_o].view(slots, num_tokens, num_heads, head_dim),
        pl[:n_l].view(slots, num_tokens, num_heads),
    )


def _outputs(q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None):
    num_tokens, num_heads, _head_dim = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1
    assert lse.shape == (num_tokens, num_heads) and lse.dtype == torch.float32
    return out, lse


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    seqs: tuple | None,
    groups: tuple | None,
    max_q_len: int,
    max_kv_len: int,
    max_prefix_len: int,
    max_group_rows: int | None,
    own_splits: int | None,
    prefix_splits: int | None,
    workspace: dict | None,
) -> None:
    """One attention launch over prefix tiles (groups) and/or own tiles (seqs), plus a reduce when needed."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, g, block_size = _check_cache(q, k_cache, v_cache)
    has_pre = groups is not None and groups[0].shape[0] > 1
    has_own = seqs is not None and seqs[0].shape[0] > 1
    if num_tokens == 0 or not (has_pre or has_own):
        return
    for t in (*(seqs or ()), *(groups or ())):
        assert t is None or (t.dtype == torch.int32 and t.device == q.device), (
            "index tensors: int32, q's device"
        )
    device = q.device
    g_pad = triton.next_power_of_2(g)
    block_n = _block_n(head_dim)
    block_d = triton.next_power_of_2(head_dim)
    bq_pre = _rows_pre(g_pad, head_dim, max_group_rows)
    bq_own = _rows_own(g_pad, head_dim, max_q_len)
    any_index = (seqs or groups)[0]  # stands in for the pointers of the absent level (never read)
    if has_pre:
        cu_g, g_lens, g_tables = groups
        n_groups = cu_g.shape[0] - 1
        # groups of few rows (decode, few members): a tile takes the heads of hpt_pre kv heads, as decode
        # tiles do, instead of padding its rows
        hpt_pre = 1
        few = triton.next_power_of_2(max(1, max_group_rows or 16))
        if few * g_pad < 16 and "block_m_pre" not in CONFIG_OVERRIDE:
            bq_pre = few
            hpt_pre = min(triton.next_power_of_2(num_kv_heads), 16 // (bq_pre * g_pad), 8)
        # a program per group when each group fits one tile ("prefix_direct"); by default a program per
        # row tile found by binary search (the in-kernel tile loop costs the prefix tile registers)
        search_pre = (
            not CONFIG_OVERRIDE.get("prefix_direct") or max_group_rows is None or max_group_rows > bq_pre
        )
        n_pre_vt = (num_tokens + n_groups * (bq_pre - 1)) // bq_pre if search_pre else n_groups
        pre_chunks = triton.cdiv(num_kv_heads, hpt_pre)
        pre_tiles = n_groups * pre_chunks * triton.cdiv(max_group_rows or 1, bq_pre)
        ps = (
            prefix_splits
            or CONFIG_OVERRIDE.get("prefix_splits")
            or _splits(pre_tiles, max_prefix_len, device, 256)
        )
    else:
        cu_g = g_lens = g_tables = any_index
        n_groups, n_pre_vt, ps, search_pre, hpt_pre, pre_chunks = 0, 0, 0, False, 1, 0
    if has_own:
        cu_q, kv_lens, tables, start = seqs
        n_seqs = cu_q.shape[0] - 1
        search_own = max_q_len > bq_own
        n_own_vt = (num_tokens + n_seqs * (bq_own - 1)) // bq_own if search_own else n_seqs
        # decode tiles (one token): the g heads of one kv head fill few of the 16 rows of a tile, so a
        # tile takes the heads of hpt kv heads (each row sees its own head's keys only)
        hpt = 1
        if bq_own == 1 and not search_own:
            hpt = CONFIG_OVERRIDE.get(
                "heads_per_tile", min(triton.next_power_of_2(num_kv_heads), max(1, 16 // g_pad), 8)
            )
        own_chunks = triton.cdiv(num_kv_heads, hpt)
        own_tiles = min(n_own_vt, n_seqs * triton.cdiv(max(max_q_len, 1), bq_own)) * own_chunks
        os_ = own_splits or CONFIG_OVERRIDE.get("own_splits")
        os_ = os_ or (_splits(own_tiles, max_kv_len, device, 256) if max_q_len <= 16 else 1)
    else:
        cu_q = kv_lens = tables = any_index
        start, n_seqs, n_own_vt, os_, search_own, hpt, own_chunks = None, 0, 0, 0, False, 1, 0
    direct = ps + os_ == 1
    if direct:
        po, pl = out, lse  # not used
        po_strides = pl_strides = (0, 0, 0)
    else:
        po, pl = _workspace(workspace, ps + os_, q, num_heads, head_dim)
        po_strides = (po.stride(0), po.stride(1), po.stride(2))
        pl_strides = (pl.stride(0), pl.stride(1), pl.stride(2))
    # Prefix programs (long: a whole prefix) come first and the short own programs fill in behind them,
    # so no long program is left for the end; "mix" spreads them among the own programs instead
    # (measured no better on H200).
    n_pre_programs, n_own_programs = n_pre_vt * ps * pre_chunks, n_own_vt * os_ * own_chunks
    mix = min(CONFIG_OVERRIDE.get("mix", 0), n_own_programs // max(n_pre_programs, 1))
    n_programs = n_pre_programs + n_own_programs
    rows_max = max(bq_pre * g_pad if has_pre else 0, bq_own * g_pad if has_own else 0)
    num_warps = CONFIG_OVERRIDE.get("num_warps", 8 if rows_max >= 128 else 4)
    _attention_kernel[(n_programs,)](
        q,
        k_cache,
        v_cache,
        cu_q,
        kv_lens,
        start if start is not None else kv_lens,
        tables,
        n_seqs,
        max(1, n_seqs.bit_length()),
        tables.stride(0),
        n_own_vt,
        cu_g,
        g_lens,
        g_tables,
        n_groups,
        max(1, n_groups.bit_length()),
        g_tables.stride(0),
        n_pre_vt,
        mix,
        out,
        lse,
        po,
        pl,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        *po_strides,
        *pl_strides,
        g,
        scale * _LOG2E,
        NUM_KV_HEADS=num_kv_heads,
        HAS_PRE=has_pre,
        HAS_OWN=has_own,
        HAS_START=start is not None,
        PRE_SPLITS=max(ps, 1),
        OWN_SPLITS=max(os_, 1),
        DIRECT=direct,
        SEARCH_PRE=search_pre,
        SEARCH_OWN=search_own,
        BQ_PRE=bq_pre,
        HPT_PRE=hpt_pre,
        BQ_OWN=bq_own,
        HPT_OWN=hpt,
        G_PAD=g_pad,
        BLOCK_N_PRE=max(CONFIG_OVERRIDE.get("block_n_pre", block_n), 8 * hpt_pre),
        # decode tiles: 128 key columns (32 keys of each of 4 kv heads for GQA 4), measured best on H200
        BLOCK_N_OWN=max(
            CONFIG_OVERRIDE.get("block_n_own", 128 if hpt > 1 and head_dim <= 128 else block_n), 8 * hpt
        ),
        # two loops (unmasked, then masked) for prefix and prefill tiles; decode tiles take one
        SPLIT_LOOP_PRE=bool(CONFIG_OVERRIDE.get("prefix_split_loop", 1)),
        SPLIT_LOOP_OWN=bool(CONFIG_OVERRIDE.get("own_split_loop", bq_own > 1)),
        BLOCK_D=block_d,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: exact, not tf32
        num_warps=num_warps,
        num_stages=_num_stages(device, prefill=has_own and bq_own > 1),
        **({"maxnreg": CONFIG_OVERRIDE["maxnreg"]} if "maxnreg" in CONFIG_OVERRIDE else {}),
    )
    if direct:
        return
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // block_d))
    _reduce_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        po,
        pl,
        out,
        lse,
        cu_g,
        n_groups,
        cu_q,
        n_seqs,
        num_heads,
        *po_strides,
        *pl_strides,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        PRE_SLOTS=ps,
        OWN_SLOTS=os_,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        HEAD_DIM=head_dim,
        STORE_LSE=True,
        num_warps=4,
    )


# --------------------------------------------------------------------------- public launchers


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    start_pos: torch.Tensor | None,
    scale: float,
    max_q_len: int,
    *,
    max_kv_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    workspace: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal paged attention of each sequence's queries to its keys [start_pos[i], kv_lens[i]).

    cu_seqlens_q [B + 1], kv_lens [B], start_pos [B] (None = 0) int32;
    block_tables [B, max_blocks] int32. max_q_len: an upper bound of the
    query lengths (1 = decode only: one token per tile). max_kv_len (default:
    the table width x block size) and the device size pick the number of
    key splits for decode rows (num_splits overrides; > 1 needs a workspace
    and a reduce launch). Returns (out [T, H, D] in q's dtype, lse [T, H] fp32).
    Rows past cu_seqlens_q[B] are left as they are (split path: 0 / -inf).
    """
    out, lse = _outputs(q, out, lse)
    bs = k_cache.shape[2]
    _launch(
        q,
        k_cache,
        v_cache,
        scale,
        out,
        lse,
        seqs=(cu_seqlens_q, kv_lens, block_tables, start_pos),
        groups=None,
        max_q_len=max_q_len,
        max_kv_len=max_kv_len if max_kv_len is not None else block_tables.shape[1] * bs,
        max_prefix_len=0,
        max_group_rows=None,
        own_splits=num_splits,
        prefix_splits=None,
        workspace=workspace,
    )
    return out, lse


def prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_group_rows: torch.Tensor,
    group_prefix_lens: torch.Tensor,
    group_block_tables: torch.Tensor,
    scale: float,
    *,
    max_prefix_len: int | None = None,
    max_group_rows: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    workspace: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared level: rows cu_group_rows[j]:cu_group_rows[j+1] attend, unmasked, to keys [0, group_prefix_lens[j]).

    cu_group_rows [G + 1], group_prefix_lens [G] int32; group_block_tables
    [G, max_prefix_blocks] int32. Each group's prefix is read once per (kv
    head, tile of max_group_rows x g rows). max_group_rows (an upper bound of
    the rows per group) sizes the tiles; max_prefix_len (default: table width
    x block size) and the device pick the key splits (num_splits overrides).
    Returns (out, lse); rows outside [cu_group_rows[0], cu_group_rows[G]) are
    left as they are (split path: 0 / -inf).
    """
    out, lse = _outputs(q, out, lse)
    bs = k_cache.shape[2]
    _launch(
        q,
        k_cache,
        v_cache,
        scale,
        out,
        lse,
        seqs=None,
        groups=(cu_group_rows, group_prefix_lens, group_block_tables),
        max_q_len=0,
        max_kv_len=0,
        max_prefix_len=max_prefix_len if max_prefix_len is not None else group_block_tables.shape[1] * bs,
        max_group_rows=max_group_rows,
        own_splits=None,
        prefix_splits=num_splits,
        workspace=workspace,
    )
    return out, lse


def two_level_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_group_rows: torch.Tensor,
    group_prefix_lens: torch.Tensor,
    group_block_tables: torch.Tensor,
    scale: float,
    max_q_len: int,
    *,
    max_kv_len: int | None = None,
    max_prefix_len: int | None = None,
    max_group_rows: int | None = None,
    own_splits: int | None = None,
    prefix_splits: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    workspace: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused two-level attention: one launch for both levels, then one reduce.

    Per sequence (as paged_attention): cu_seqlens_q [B + 1], kv_lens [B],
    block_tables [B, max_blocks], prefix_lens [B] (the group's prefix length
    for members, 0 for plain sequences): own keys [prefix_lens[i], kv_lens[i]).
    Per group (as prefix_attention): cu_group_rows [G + 1] (rows
    [cu_group_rows[0], cu_group_rows[G]) are exactly the members' rows, group
    by group; a plain sequence between groups may be given as a group with
    prefix length 0), group_prefix_lens [G], group_block_tables [G, width].
    All int32 and of static shape: pad sequences with q_len 0 (repeat the last
    cu_seqlens_q entry, kv_lens 0) and groups with 0 rows. The result equals
    merge(paged_attention(start_pos=prefix_lens), prefix_attention(...)) on
    group rows and paged_attention from 0 elsewhere. Rows past
    cu_seqlens_q[B] get 0 and lse -inf.

    max_q_len, max_kv_len, max_prefix_len, max_group_rows are host upper
    bounds used for tile sizes and split counts only (own_splits /
    prefix_splits override). The partial results need a workspace of (prefix
    splits + own splits) x T x H x D values in q's dtype plus as many float32
    lse / D, kept in `workspace` (a dict reused across layers and CUDA-graph
    replays) when given.
    """
    out, lse = _outputs(q, out, lse)
    bs = k_cache.shape[2]
    _launch(
        q,
        k_cache,
        v_cache,
        scale,
        out,
        lse,
        seqs=(cu_seqlens_q, kv_lens, block_tables, prefix_lens),
        groups=(cu_group_rows, group_prefix_lens, group_block_tables),
        max_q_len=max_q_len,
        max_kv_len=max_kv_len if max_kv_len is not None else block_tables.shape[1] * bs,
        max_prefix_len=max_prefix_len if max_prefix_len is not None else group_block_tables.shape[1] * bs,
        max_group_rows=max_group_rows,
        own_splits=own_splits,
        prefix_splits=prefix_splits,
        workspace=workspace,
    )
    return out, lse


def merge_attention(
    o1: torch.Tensor,
    lse1: torch.Tensor,
    o2: torch.Tensor,
    lse2: torch.Tensor,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = (o1 e^lse1 + o2 e^lse2) / (e^lse1 + e^lse2) per row and head; -inf on either side is fine.

    o [T, H, D], lse [T, H] float32. out may alias o1 (or o2); lse_out, when
    given, receives the merged lse (and may alias lse1).
    """
    num_tokens, num_heads, head_dim = o1.shape
    assert o2.shape == o1.shape and lse1.shape == (num_tokens, num_heads) and lse2.shape == lse1.shape
    if out is None:
        out = torch.empty_like(o1, memory_format=torch.contiguous_format)
    assert out.shape == o1.shape
    assert o1.stride(-1) == 1 and o2.stride(-1) == 1 and out.stride(-1) == 1
    if num_tokens == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // block_d))
    lse_arg = lse_out if lse_out is not None else lse1
    _merge_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        o1,
        lse1,
        o2,
        lse2,
        out,
        lse_arg,
        num_heads,
        o1.stride(0),
        o1.stride(1),
        lse1.stride(0),
        lse1.stride(1),
        o2.stride(0),
        o2.stride(1),
        lse2.stride(0),
        lse2.stride(1),
        out.stride(0),
        out.stride(1),
        lse_arg.stride(0),
        lse_arg.stride(1),
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        HEAD_DIM=head_dim,
        STORE_LSE=lse_out is not None,
        num_warps=4,
    )
    return out
