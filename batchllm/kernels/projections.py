"""Projections that do their elementwise work in the GEMM's epilogue: gate/up + SiLU-and-mul, QKV + RoPE.

Unfused, a prefill step's gate/up GEMM writes [T, 2I] (gate | up) and a second
kernel reads it back to write [T, I] (6 bytes per intermediate element through
memory, ~4% of a prefill-only run on an H100), and the QKV GEMM's queries and
keys go through memory once more for RoPE (~1%). Here each program computes
two weight tiles of one output tile from the same rows of x (two accumulators,
the x tile loaded once): gate and up, or the two halves of one head, which is
what rotate-half RoPE pairs; the epilogue writes only the finished values.
Programs take the output tiles in row groups (GROUP_M: a wave of tiles shares
rows of x and weight rows in L2); TMA descriptors feed the tiles. One program
per tile: persistent programs ran 15% slower (H100, bench/RESULTS.md).

Rounding matches the unfused path: the accumulators are rounded to the output
dtype as the GEMM writes them (bias added first, in float32), then SiLU and the
product as ``elementwise.silu_mul``, RoPE as ``elementwise.rope_``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# per projection: (block_m, block_n, block_k, num_stages, num_warps, group_m); block_n is per accumulator.
# gate/up: the fastest of bench.fused_gemm's sweep on an H100 (bench/RESULTS.md); QKV: block_n is half
# a head (set by the model), the rest as gate/up
DEFAULT_CONFIG = {"gate_up": (128, 128, 64, 3, 8, 16), "qkv": (128, 0, 64, 3, 8, 16)}
CONFIG_OVERRIDE: dict[str, dict[str, int]] = {"gate_up": {}, "qkv": {}}  # bench.fused_gemm's sweeps
KEYS = ("block_m", "block_n", "block_k", "num_stages", "num_warps", "group_m")


@triton.jit
def _tile_origin(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (first row, first column), tiles taken in groups of GROUP_M rows."""
    tile = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    rows = min(num_m - first_m, GROUP_M)
    return (first_m + (tile % per_group) % rows) * BLOCK_M, ((tile % per_group) // rows) * BLOCK_N


@triton.jit
def _two_products(x_desc, w_desc, om, row_a, row_b, K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x[om:om+BM] times weight rows [row_a, +BN) and [row_b, +BN), transposed: two [BM, BN] float32."""
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        ok = ki * BLOCK_K
        a = x_desc.load([om, ok])
        acc_a = tl.dot(a, w_desc.load([row_a, ok]).T, acc_a)
        acc_b = tl.dot(a, w_desc.load([row_b, ok]).T, acc_b)
    return acc_a, acc_b


@triton.jit
def _gate_up_silu_kernel(x_desc, w_desc, out_desc, M, N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    om, on = _tile_origin(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc_g, acc_u = _two_products(x_desc, w_desc, om, on, N + on, K, BLOCK_M, BLOCK_N, BLOCK_K)
    dt = out_desc.dtype
    gf = acc_g.to(dt).to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(dt).to(tl.float32)
    out_desc.store([om, on], (s * acc_u.to(dt).to(tl.float32)).to(dt))


@triton.jit
def _qkv_rope_kernel(x_desc, w_desc, q_desc, kv_desc, bias_ptr, pos_ptr, table_ptr, stride_tp, stride_tc, M,
                     Q_HEADS: tl.constexpr, ROPE_HEADS: tl.constexpr, HEADS: tl.constexpr, K: tl.constexpr,
                     HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     HAS_BIAS: tl.constexpr):  # fmt: skip
    """One head of BLOCK_M rows: its two halves, bias, RoPE for query and key heads, into q or kv."""
    om, on2 = _tile_origin(M, HEADS * HALF, BLOCK_M, HALF, GROUP_M)
    head = on2 // HALF
    on = head * 2 * HALF
    x1, x2 = _two_products(x_desc, w_desc, om, on, on + HALF, K, BLOCK_M, HALF, BLOCK_K)
    d = tl.arange(0, HALF)
    if HAS_BIAS:
        x1 += tl.load(bias_ptr + on + d).to(tl.float32)[None, :]
        x2 += tl.load(bias_ptr + on + HALF + d).to(tl.float32)[None, :]
    dt = q_desc.dtype
    x1 = x1.to(dt).to(tl.float32)
    x2 = x2.to(dt).to(tl.float32)
    if head < ROPE_HEADS:
        rows = om + tl.arange(0, BLOCK_M)
        pos = tl.load(pos_ptr + rows, mask=rows < M, other=0).to(tl.int64)
        at = table_ptr + pos[:, None] * stride_tp + d[None, :]
        cos = tl.load(at).to(dt).to(tl.float32)
        sin = tl.load(at + stride_tc).to(dt).to(tl.float32)
        a1 = (x1 * cos).to(dt).to(tl.float32)
        a2 = (x2 * cos).to(dt).to(tl.float32)
        b1 = (-x2 * sin).to(dt).to(tl.float32)  # rotate_half: [-x2, x1]
        b2 = (x1 * sin).to(dt).to(tl.float32)
        x1 = a1 + b1
        x2 = a2 + b2
    if head < Q_HEADS:
        q_desc.store([om, on], x1.to(dt))
        q_desc.store([om, on + HALF], x2.to(dt))
    else:
        kv_desc.store([om, on - Q_HEADS * 2 * HALF], x1.to(dt))
        kv_desc.store([om, on - Q_HEADS * 2 * HALF + HALF], x2.to(dt))


def _config(name: str, **fixed: int) -> tuple[int, ...]:
    given = {**CONFIG_OVERRIDE[name], **fixed}
    return tuple(given.get(k, d) for k, d in zip(KEYS, DEFAULT_CONFIG[name], strict=True))


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert weight.shape[1] == x.shape[1] and weight.dtype == x.dtype and weight.is_contiguous()
    assert x.stride(-1) == 1


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for weight [2I, H] = [gate | up] rows (the fused projection's
    weight, no bias) and x [T, H]: [T, I] in x's dtype."""
    _check(x, weight)
    rows, hidden = x.shape
    n = weight.shape[0] // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    bm, bn, bk, stages, warps, group_m = _config("gate_up")
    _gate_up_silu_kernel[(triton.cdiv(rows, bm) * triton.cdiv(n, bn),)](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn]), rows, n, hidden,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return out


def qkv_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    table: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The QKV projection of x [T, H] (weight [(heads + 2 kv_heads) * head_dim, H], optional bias) with
    rotate-half RoPE on queries and keys at ``positions`` [T] (``table``: [max_len, 2, head_dim]
    float32 cos/sin, ``rope.rope_table``): queries [T, heads * head_dim] and keys | values
    [T, 2 * kv_heads * head_dim], each contiguous, in x's dtype."""
    _check(x, weight)
    rows, hidden = x.shape
    heads = num_heads + 2 * num_kv_heads
    dim = weight.shape[0] // heads
    assert weight.shape[0] == heads * dim and dim % 2 == 0 and table.dtype == torch.float32
    assert table.is_contiguous() and table.shape[2] == dim and positions.shape == (rows,)
    assert positions.is_contiguous()
    q = torch.empty((rows, num_heads * dim), dtype=x.dtype, device=x.device)
    kv = torch.empty((rows, 2 * num_kv_heads * dim), dtype=x.dtype, device=x.device)
    if rows == 0:
        return q, kv
    half = dim // 2
    bm, _, bk, stages, warps, group_m = _config("qkv", block_n=half)
    _qkv_rope_kernel[(triton.cdiv(rows, bm) * heads,)](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(weight, [half, bk]),
        TensorDescriptor.from_tensor(q, [bm, half]), TensorDescriptor.from_tensor(kv, [bm, half]),
        x if bias is None else bias, positions, table, table.stride(0), table.stride(1), rows,
        Q_HEADS=num_heads, ROPE_HEADS=num_heads + num_kv_heads, HEADS=heads, K=hidden, HALF=half,
        BLOCK_M=bm, BLOCK_K=bk, GROUP_M=group_m, HAS_BIAS=bias is not None, num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return q, kv
