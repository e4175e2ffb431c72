"""Launch heuristics: tile sizes, warps, pipeline stages and key splits, and CONFIG_OVERRIDE.

No autotuning (it is slow and breaks graph capture): BLOCK_N 64 (128 columns
for decode tiles), 4 warps (8 for 128-row tiles, 16 for 256-row prefill
tiles), 2 pipeline stages for memory-bound launches and 3
for prefill, key splits only when the tiles would not fill the GPU twice
over. CONFIG_OVERRIDE changes them for benchmarks.
"""

from __future__ import annotations

import json
import os

import torch
import triton

# Tuning knobs for benchmarks (empty = the built-in heuristic). Keys: block_n,
# num_warps, wide_warps, wide_own_rows, num_stages, maxnreg, block_m_pre, block_m_own (rows of a tile:
# tokens x padded g), target_programs, prefix_splits, own_splits, mix (own
# programs after each prefix program in a fused launch), prefix_direct,
# block_n_pre, block_n_own, prefix_split_loop, own_split_loop, heads_per_tile, separate. An engine benchmark
# sets them from the environment: BATCHLLM_ATTENTION_CONFIG='{"block_m_pre": 128}'.
CONFIG_OVERRIDE: dict[str, int] = json.loads(os.environ.get("BATCHLLM_ATTENTION_CONFIG") or "{}")


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


def _rows_pre(g_pad: int, head_dim: int, max_group_rows: int | None, wide: bool = False) -> int:
    """Query tokens per shared-prefix tile: rows = tokens x g_pad, 16..64, or 16..256 when `wide`.

    wide: the launch runs 8 warps anyway (prefill own tiles of 128+ rows). A group then prefills
    many rows against its prefix, and 256-row tiles read that prefix half as often as 128 and a
    quarter as often as 64: measured 2.2x faster than 64 (H200, 100 x 160 tokens against 4,000-token
    prefixes, bench.prefill_attention, bench/RESULTS.md 2026-12-03 late)."""
    if "block_m_pre" in CONFIG_OVERRIDE:
        return max(1, CONFIG_OVERRIDE["block_m_pre"] // g_pad)
    # 64 rows at most otherwise: a 128-row tile would need 8 warps, which the own-level (decode) tiles
    # of a fused launch (same kernel, same warps) take badly; bigger groups take several tiles,
    # adjacent programs, so their prefix is read from L2 after the first
    rows = 64 if max_group_rows is None else triton.next_power_of_2(max(1, max_group_rows)) * g_pad
    rows = min(max(rows, 16), 256 if wide else 64)
    return max(1, rows // g_pad)


def _rows_own(g_pad: int, head_dim: int, max_q_len: int, mean_q_len: float = 0.0, elem_bytes: int = 2) -> int:
    """Query tokens per own-level tile: one for decode-only batches, else 64, 128 or 256 rows.

    256 rows (with 16 warps, see _num_warps) when the step's sequences average 512+ rows (128
    tokens for GQA 4): 410 against 322 TFLOP/s for 128 rows and 8 warps on 2 x 8,192 causal tokens,
    411 against 294 after 8,192 cached keys, level (326 against 325) for members' suffixes beside
    256-row prefix tiles (H200, bench.prefill_attention, bench/RESULTS.md 2026-12-04). A short
    sequence (a decode row in a mixed step) still takes a whole tile, so the mean decides. Float32
    inputs (elem_bytes 4) keep 128 rows: a 256-row tile's staged K/V overflow the shared memory.
    CONFIG_OVERRIDE: wide_own_rows (the mean rows from which tiles are 256; huge = never)."""
    if "block_m_own" in CONFIG_OVERRIDE:
        return max(1, CONFIG_OVERRIDE["block_m_own"] // g_pad)
    if max_q_len <= 1:
        return 1
    rows = 128 if max_q_len * g_pad >= 256 and head_dim <= 128 else 64
    if head_dim * elem_bytes <= 256 and mean_q_len * g_pad >= CONFIG_OVERRIDE.get("wide_own_rows", 512):
        rows = 256
    rows = min(rows, max(16, triton.next_power_of_2(max_q_len) * g_pad))
    return max(1, rows // g_pad)


def _num_warps(rows_max: int, own_rows: int) -> int:
    """16 warps for 256-row own tiles (a warpgroup per 64 rows, as 128-row tiles with 8 warps have, and
    K/V loaded once for all four), 8 for 128+ rows, else 4. CONFIG_OVERRIDE: num_warps, wide_warps."""
    if "num_warps" in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE["num_warps"]
    if own_rows >= 256:
        return CONFIG_OVERRIDE.get("wide_warps", 16)
    return 8 if rows_max >= 128 else 4


def _separate_levels(max_q_len: int, tree: bool) -> bool:
    """Decode steps run the two levels as two launches (the prefix level on a side stream), not one fused
    launch: each kernel then keeps its own registers (fused: 255 and spills; alone: 205 and 209, none)
    and the two overlap. One layer of (a)'s decode: 0.732 against 0.767 ms fused; P=512 with 4
    members 0.731 against 0.836 (H200, bench.attention, bench/RESULTS.md 2026-12-04 evening).
    Prefill tiles stay fused (compute-bound). CONFIG_OVERRIDE: separate (0 or 1)."""
    if "separate" in CONFIG_OVERRIDE:
        return bool(CONFIG_OVERRIDE["separate"])
    return max_q_len <= 1 and not tree


def _splits(tiles: int, max_keys: int, device: torch.device, min_chunk: int) -> int:
    """Key splits so that `tiles` work items fill the device (>= min_chunk keys per split), rounded down
    to a power of two."""
    target = CONFIG_OVERRIDE.get("target_programs", 2 * _sm_count(device))
    if tiles >= target or max_keys <= min_chunk:
        return 1
    # rounded down to a power of two: the engine numbers of bench/RESULTS.md (2026-12-03, night) were
    # measured so; split counts are runtime kernel arguments, so this no longer bounds compiled variants
    splits = min(triton.cdiv(target, max(tiles, 1)), triton.cdiv(max_keys, min_chunk), 32)
    return 1 << (max(1, splits).bit_length() - 1)
