"""One attention call: the kernel over prefix and/or own tiles (tile sizes and key splits from
heuristics.py; both levels in one launch, or for decode in two launches on two streams), plus the
reduce when the results are split into a workspace."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton

from .fused import _attention_kernel, _reduce_kernel
from .heuristics import (
    CONFIG_OVERRIDE,
    _block_n,
    _num_stages,
    _num_warps,
    _rows_own,
    _rows_pre,
    _separate_levels,
    _splits,
)

_LOG2E = 1.4426950408889634


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


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU, for the prefix level of a decode step beside its own level."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


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
    tree: tuple | None = None,
) -> None:
    """Attention over prefix tiles (groups) and/or own tiles (seqs): one launch, or two on two streams
    (heuristics._separate_levels), plus a reduce when needed.

    tree: (key_ends, offsets, open_ends) int32 of the own level's tree mask (tree.py), or None: the
    TREE variant of the kernel is compiled only for steps that hold a tree sequence.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, g, block_size = _check_cache(q, k_cache, v_cache)
    has_pre = groups is not None and groups[0].shape[0] > 1
    has_own = seqs is not None and seqs[0].shape[0] > 1
    if num_tokens == 0 or not (has_pre or has_own):
        return
    use_tree = tree is not None and has_own
    for t in (*(seqs or ()), *(groups or ()), *(tree if use_tree else ())):
        assert t is None or (t.dtype == torch.int32 and t.device == q.device), (
            "index tensors: int32, q's device"
        )
    # lengths agree with the offsets (host shapes only, no sync): a short one reads past its end
    for offsets, *per in filter(None, (seqs, groups)):
        n = offsets.shape[0] - 1
        if short := [t.shape[0] for t in per if t is not None and t.shape[0] < n]:
            raise ValueError(f"attention: an index tensor of {short[0]} rows for {n} sequences or groups")
    device = q.device
    g_pad = triton.next_power_of_2(g)
    block_n = _block_n(head_dim)
    block_d = triton.next_power_of_2(head_dim)
    n_seqs = seqs[0].shape[0] - 1 if has_own else 0
    bq_own = _rows_own(g_pad, head_dim, max_q_len, num_tokens / max(n_seqs, 1), q.element_size())
    # 256-row prefix tiles beside 128+ row own tiles, in 16-bit inputs (float32 ones overflow shared memory)
    wide = has_own and bq_own * g_pad >= 128 and q.element_size() <= 2
    bq_pre = _rows_pre(g_pad, head_dim, max_group_rows, wide=wide)
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
        start, n_own_vt, os_, search_own, hpt, own_chunks = None, 0, 0, False, 1, 0
    ends, ends_off, open_ends = tree if use_tree else (any_index, any_index, any_index)
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
    rows_pre, rows_own = (bq_pre * g_pad if has_pre else 0), (bq_own * g_pad if has_own else 0)
    block_n_pre = max(CONFIG_OVERRIDE.get("block_n_pre", block_n), 8 * hpt_pre)
    # decode tiles: 128 key columns (32 keys of each of 4 kv heads for GQA 4), measured best on H200
    block_n_own = max(
        CONFIG_OVERRIDE.get("block_n_own", 128 if hpt > 1 and head_dim <= 128 else block_n), 8 * hpt
    )
    stages = _num_stages(device, prefill=has_own and bq_own > 1)
    extra = {"maxnreg": CONFIG_OVERRIDE["maxnreg"]} if "maxnreg" in CONFIG_OVERRIDE else {}

    def run(programs: int, pre: bool, own: bool, warps: int, mix_: int, target: tuple | None = None) -> None:
        """The kernel over the prefix programs (pre), the own programs (own) or both. target: (out, lse)
        written directly (DIRECT) instead of the call's."""
        o_, l_, direct_ = (out, lse, direct) if target is None else (*target, True)
        _attention_kernel[(programs,)](
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
            ends,
            ends_off,
            open_ends,
            cu_g,
            g_lens,
            g_tables,
            n_groups,
            max(1, n_groups.bit_length()),
            g_tables.stride(0),
            n_pre_vt,
            mix_,
            o_,
            l_,
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
            o_.stride(0),
            o_.stride(1),
            l_.stride(0),
            l_.stride(1),
            *po_strides,
            *pl_strides,
            g,
            scale * _LOG2E,
            ps,  # an own-only launch writes its split results after the prefix slots (0 without a prefix)
            max(os_, 1),
            NUM_KV_HEADS=num_kv_heads,
            HAS_PRE=pre,
            HAS_OWN=own,
            HAS_START=start is not None,
            DIRECT=direct_,
            TREE=use_tree,
            SEARCH_PRE=search_pre,
            SEARCH_OWN=search_own,
            BQ_PRE=bq_pre,
            HPT_PRE=hpt_pre,
            BQ_OWN=bq_own,
            HPT_OWN=hpt,
            G_PAD=g_pad,
            BLOCK_N_PRE=block_n_pre,
            BLOCK_N_OWN=block_n_own,
            # two loops (unmasked, then masked) for prefix and prefill tiles; decode tiles take one
            SPLIT_LOOP_PRE=bool(CONFIG_OVERRIDE.get("prefix_split_loop", 1)),
            SPLIT_LOOP_OWN=bool(CONFIG_OVERRIDE.get("own_split_loop", bq_own > 1)),
            BLOCK_D=block_d,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: exact, not tf32
            num_warps=warps,
            num_stages=stages,
            **extra,
        )

    if has_pre and has_own and _separate_levels(max_q_len, use_tree):
        # two launches, each compiled with its own registers, the prefix level on a side stream. An
        # unsplit own level writes its workspace slot directly: the variant that writes split results
        # spills (255 registers against 209, H200)
        pre_warps, own_warps = _num_warps(rows_pre, 0), _num_warps(rows_own, rows_own)
        own_target = (po[ps], pl[ps]) if os_ == 1 else None
        cuda = device.type == "cuda"  # the interpreter runs them one after the other
        if cuda:
            main, side = torch.cuda.current_stream(device), _side_stream(device)
            side.wait_stream(main)
        with torch.cuda.stream(side) if cuda else nullcontext():
            run(n_pre_programs, True, False, pre_warps, 0)
        run(n_own_programs, False, True, own_warps, 0, own_target)
        if cuda:
            main.wait_stream(side)
    else:
        run(n_programs, has_pre, has_own, _num_warps(max(rows_pre, rows_own), rows_own), mix)
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
        ps,
        os_,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        HEAD_DIM=head_dim,
        STORE_LSE=True,
        num_warps=4,
    )
