"""The public attention launchers: paged_attention (own level), prefix_attention (shared level) and
two_level_attention (both levels fused); each makes out / lse when not given and calls _launch."""

from __future__ import annotations

import torch

from .launch import _launch


def _outputs(q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None):
    num_tokens, num_heads, _head_dim = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1
    assert lse.shape == (num_tokens, num_heads) and lse.dtype == torch.float32
    return out, lse


def _tree(
    key_ends: torch.Tensor | None, key_offsets: torch.Tensor | None, open_ends: torch.Tensor | None, kv_lens
) -> tuple | None:
    """The tree-mask arguments of a launch (None: plain causal); open_ends defaults to none open."""
    if key_ends is None:
        return None
    assert key_offsets is not None and key_offsets.shape == kv_lens.shape, "key_offsets: one per sequence"
    if open_ends is None:
        open_ends = torch.zeros_like(kv_lens)
    assert open_ends.shape == kv_lens.shape, "open_ends: one per sequence"
    return (key_ends, key_offsets, open_ends)


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
    key_ends: torch.Tensor | None = None,
    key_offsets: torch.Tensor | None = None,
    open_ends: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal paged attention of each sequence's queries to its keys [start_pos[i], kv_lens[i]).

    cu_seqlens_q [B + 1], kv_lens [B], start_pos [B] (None = 0) int32;
    block_tables [B, max_blocks] int32. max_q_len: an upper bound of the
    query lengths (1 = decode only: one token per tile). max_kv_len (default:
    the table width x block size) and the device size pick the number of
    key splits for decode rows (num_splits overrides; > 1 needs a workspace
    and a reduce launch). Returns (out [T, H, D] in q's dtype, lse [T, H] fp32).
    Rows past cu_seqlens_q[B] are left as they are (split path: 0 / -inf).

    Tree sequences (packed items, label nodes): with key_ends [sum of the
    sequences' key counts] int32, query q of sequence i sees key k only when
    k <= q < key_ends[key_offsets[i] + k]; open_ends[i] (default: none) bounds
    the keys every later query sees (``tree_bounds`` makes both on the host;
    plain sequences of the step get key ends past every query).
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
        tree=_tree(key_ends, key_offsets, open_ends, kv_lens),
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
    key_ends: torch.Tensor | None = None,
    key_offsets: torch.Tensor | None = None,
    open_ends: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-level attention: both levels in one launch (decode: two launches on two streams), then one reduce.

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
    replays) when given. key_ends, key_offsets, open_ends: the tree mask of the
    own level, as in paged_attention (a group's prefix keys must be seen by
    every member query: prefix tiles take no mask).
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
        tree=_tree(key_ends, key_offsets, open_ends, kv_lens),
    )
    return out, lse
