"""The own level: the programs of per-sequence tiles (plain paged attention, or a member's own keys).

An own program attends BQ query tokens of one sequence (x the g heads of HPT
kv heads) to the sequence's keys [start, kv_len), causal, over one key split.
Tree sequences (TREE launches: packed items, label nodes) add their key ends'
mask (see tiles._attend_tile); the TREE=False variant is the plain kernel.
Results go to out/lse directly or to a workspace slot for the reduce (see
fused.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import _attend_tile, _locate, _store_tile


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
    ends_ptr,
    open_end,
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
    splits,
    slot0,
    DIRECT: tl.constexpr,
    TREE: tl.constexpr,
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
    chunk = ((span + splits - 1) // splits + step - 1) // step * step
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
        ends_ptr,
        open_end,
        NUM_KV_HEADS,
        True,
        TREE,
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
        slot = split + slot0
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
    ends_ptr,
    ends_off_ptr,
    open_ptr,
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
    splits,
    slot0,
    DIRECT: tl.constexpr,
    TREE: tl.constexpr,
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
    """Own-level tiles of one (sequence, HPT kv heads, key split): BQ query tokens x their heads, causal
    (TREE: and the tree mask of the sequence's key ends, ends_ptr + ends_off_ptr[i]).

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
    if TREE:
        # the sequence's key ends (key k of the sequence at ends_i[k]) and its open end (host-made)
        ends_i = ends_ptr + tl.load(ends_off_ptr + i)
        open_i = tl.load(open_ptr + i)
    else:
        ends_i = ends_ptr
        open_i = kv_len
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
                ends_i,
                open_i,
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
                splits,
                slot0,
                DIRECT,
                TREE,
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
                ends_i,
                open_i,
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
                splits,
                slot0,
                DIRECT,
                TREE,
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
