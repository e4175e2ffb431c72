"""The shared level of two-level attention: the programs of prefix tiles.

A prefix program attends the rows of one group (its members' query tokens x
the g heads of HPT kv heads) to the group's prefix keys [0, prefix_len),
unmasked, over one key split, so the prefix is read once per (group, kv head,
row tile) and not once per member. Results go to out/lse directly or to a
workspace slot for the reduce (see fused.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import _attend_tile, _locate, _store_tile


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
        g_tables_ptr,  # key ends: prefix tiles take no tree mask (every member query sees its prefix)
        hi,
        NUM_KV_HEADS,
        False,
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
    splits,
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
    chunk = ((plen + splits - 1) // splits + step - 1) // step * step
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
