"""The @triton.jit helpers every attention program shares: find a row tile, attend it, store it.

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
"""

from __future__ import annotations

import triton
import triton.language as tl

# The kernels call builtins of triton.language and jit functions of this package only: the library's
# own jit helpers (tl.max, tl.sum, tl.cdiv, tl.zeros) are bound to compiled or interpreted mode when
# triton is first imported, so avoiding them lets these kernels run interpreted even when triton was
# imported first without TRITON_INTERPRET. Reductions go through tl.reduce with the library's combine
# functions (what tl.max / tl.sum use), which the interpreter recognises and evaluates with numpy;
# ours are the fallback should those names move.


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
_MIN = getattr(tl.standard, "_elementwise_min", _min_combine)
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
    ends_ptr,
    open_end,
    NUM_KV_HEADS: tl.constexpr,
    CAUSAL: tl.constexpr,
    TREE: tl.constexpr,
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

    TREE (causal tiles of tree sequences): key n is also hidden from queries at
    or past ends_ptr[n] (the sequence's key ends). The unmasked loop stops at
    open_end (keys before it are seen by every later query of the step), and
    the masked loop starts at the first key a query of the tile sees, past
    the earlier items of a pack (found from the key ends, without K or V).
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
        if TREE:
            all_see = tl.minimum(all_see, open_end)
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
    if TREE:
        # keys every query of the tile sees that the unmasked loop left (less than one step), then,
        # from the first key a query of the tile sees, the rest: the earlier items of a pack are
        # skipped from their key ends alone, without reading their K or V
        see_all = tl.maximum(tl.minimum(tl.minimum(key_hi, qpos0 + 1), open_end), full_end)
        acc, m_i, l_i = _tree_range(
            q,
            acc,
            m_i,
            l_i,
            k_ptr,
            v_ptr,
            table_ptr,
            ends_ptr,
            stride_kb,
            stride_ko,
            stride_vb,
            stride_vo,
            k_hoff,
            v_hoff,
            full_end,
            see_all,
            qpos,
            c_row,
            c_col,
            col_ok,
            d,
            d_ok,
            qk_scale,
            HPT,
            BLOCK_N,
            BNH,
            BLOCK_SIZE,
            DOT_PRECISION,
        )
        first = _first_seen(ends_ptr, see_all, key_hi, qpos0)
        acc, m_i, l_i = _tree_range(
            q,
            acc,
            m_i,
            l_i,
            k_ptr,
            v_ptr,
            table_ptr,
            ends_ptr,
            stride_kb,
            stride_ko,
            stride_vb,
            stride_vo,
            k_hoff,
            v_hoff,
            first,
            key_hi,
            qpos,
            c_row,
            c_col,
            col_ok,
            d,
            d_ok,
            qk_scale,
            HPT,
            BLOCK_N,
            BNH,
            BLOCK_SIZE,
            DOT_PRECISION,
        )
    else:
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
def _first_seen(ends_ptr, key_lo, key_hi, qpos0):
    """The first key in [key_lo, key_hi) whose end lies past qpos0 (key_hi if none): keys before it
    are seen by no query at or after qpos0. Reads the key ends only (4 bytes a key)."""
    SCAN: tl.constexpr = 256
    scan = tl.arange(0, SCAN)
    first = key_hi
    for s0 in range(key_lo, key_hi, SCAN):
        k = s0 + scan
        seen = tl.load(ends_ptr + k, mask=k < key_hi, other=0) > qpos0
        first = tl.minimum(first, tl.reduce(tl.where(seen, k, key_hi), 0, _MIN))
    return first


@triton.jit
def _tree_range(
    q,
    acc,
    m_i,
    l_i,
    k_ptr,
    v_ptr,
    table_ptr,
    ends_ptr,
    stride_kb,
    stride_ko,
    stride_vb,
    stride_vo,
    k_hoff,
    v_hoff,
    key_lo,
    key_hi,
    qpos,
    c_row,
    c_col,
    col_ok,
    d,
    d_ok,
    qk_scale,
    HPT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BNH: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The masked loop of a tree tile over keys [key_lo, key_hi): causal and k <= q < key_end[k].

    The same steps as _attend_tile's masked loop, plus the key ends' term (no branch inside the
    loop, so it pipelines as that one does).
    """
    cols = tl.arange(0, BLOCK_N)
    for start in range(key_lo, key_hi, BNH):
        n = start + cols % BNH
        n_ok = n < key_hi
        ends = tl.load(ends_ptr + n, mask=n_ok, other=0)
        blk = tl.load(table_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        off = n % BLOCK_SIZE
        k_rows = blk * stride_kb + off * stride_ko + k_hoff
        v_rows = blk * stride_vb + off * stride_vo + v_hoff
        kv_mask = (n_ok & col_ok)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = s * qk_scale
        vis = n_ok[None, :] & (n[None, :] <= qpos[:, None]) & (qpos[:, None] < ends[None, :])
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
