"""The attention kernel (prefix and/or own programs in one launch) and the reduce of its split results.

Rows to programs. Decode batches (max_q_len <= 1) take one program per
(sequence, HPT kv heads, key split); a program loops over its sequence's row
tiles, so an understated max_q_len is slow, not wrong. Otherwise item i (a
sequence, or a group) with n_i rows from cu[i] owns the "virtual" tiles
[v(i), v(i+1)) with v(i) = (cu[i] - cu[0] + i * (BQ - 1)) // BQ, at least
ceil(n_i / BQ) of them; so (rows + items * (BQ - 1)) // BQ programs cover
every row, a program finds its item by binary search on cu, and programs past
an item's rows exit at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .own import _own_program
from .prefix import _prefix_program


# Counts, tile totals and block-table widths change every step: specializing on them (divisibility
# by 16, == 1) would compile a new variant of this large kernel in the middle of a run.
@triton.jit(
    do_not_specialize=[
        "n_seqs",
        "seq_steps",
        "stride_tab",
        "n_own_vt",
        "n_groups",
        "group_steps",
        "stride_gtab",
        "n_pre_vt",
        "mix",
        "pre_splits",
        "own_splits",
        "stride_pos",
        "stride_pot",
        "stride_pls",
        "stride_plt",
    ]
)
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
    ends_ptr,
    ends_off_ptr,
    open_ptr,
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
    pre_splits,
    own_splits,
    NUM_KV_HEADS: tl.constexpr,
    HAS_PRE: tl.constexpr,
    HAS_OWN: tl.constexpr,
    HAS_START: tl.constexpr,
    DIRECT: tl.constexpr,
    TREE: tl.constexpr,
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
    DIRECT (one level, one split) writes out/lse (an own-only launch beside a
    prefix-only one passes its workspace slot as out/lse); otherwise split s of the
    prefix writes workspace slot s and split s of the own level slot
    pre_splits + s (also in an own-only launch beside a prefix-only one; 0
    when there is no prefix level), and _reduce_kernel combines them. TREE: own tiles also
    take the tree mask (key ends ends_ptr[ends_off_ptr[i] + k], keys before
    open_ptr[i] seen by every later query of the step); prefix tiles never do.
    """
    pid = tl.program_id(0)
    if HAS_PRE:
        # prefix program k sits at pid k * (mix + 1): mix own programs follow each prefix program
        n_pre = n_pre_vt * (((NUM_KV_HEADS + HPT_PRE - 1) // HPT_PRE) * pre_splits)
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
                pre_splits,
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
                NUM_KV_HEADS,
                HAS_START,
                own_splits,
                pre_splits,
                DIRECT,
                TREE,
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
            NUM_KV_HEADS,
            HAS_START,
            own_splits,
            pre_splits,
            DIRECT,
            TREE,
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


@triton.jit(
    do_not_specialize=[
        "n_groups",
        "n_seqs",
        "stride_pos",
        "stride_pot",
        "stride_pls",
        "stride_plt",
        "pre_slots",
        "own_slots",
    ]
)
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
    pre_slots,
    own_slots,
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
    in_pre = (row >= tl.load(cu_g_ptr)) & (row < tl.load(cu_g_ptr + n_groups)) & (pre_slots > 0)
    in_own = (row >= tl.load(cu_q_ptr)) & (row < tl.load(cu_q_ptr + n_seqs)) & (own_slots > 0)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_sum = tl.full([BLOCK_H], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_D], 0.0, dtype=tl.float32)
    for s in range(pre_slots + own_slots):
        valid = tl.where(s < pre_slots, in_pre, in_own)
        # slots x a slot's stride passes 2^31 elements in big prefill steps with many key splits
        s64 = tl.cast(s, tl.int64)
        ls = tl.load(
            pl_ptr + s64 * stride_pls + row64 * stride_plt + h * stride_plh,
            mask=h_ok & valid,
            other=float("-inf"),
        )
        has = ls > float("-inf")
        o = tl.load(
            po_ptr + s64 * stride_pos + row64 * stride_pot + h[:, None] * stride_poh + d[None, :],
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
