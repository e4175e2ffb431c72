"""The MLP's gate/up projection with SiLU-and-mul in its epilogue: one GEMM writes silu(gate) * up.

Unfused, a prefill step's gate/up GEMM writes [T, 2I] (gate | up) and a second
kernel reads it back to write [T, I]: 6 bytes per intermediate element through
memory (0.1-0.5 ms beside the GEMM's 5.3-5.6 ms at 16,384 rows on an H100, the
GPU's clock drifting between timings; bench/RESULTS.md). Here each
program computes a gate tile and the matching up tile from the same rows of x
(two accumulators, the x tile loaded once) and writes only their product.
Programs take the output tiles in row groups (GROUP_M: a wave of tiles shares
rows of x and weight rows in L2); TMA descriptors feed the tiles (Hopper and
later). One program per tile: persistent programs took 6.84 ms against 5.82 ms
at 16,384 rows on an H100.

Rounding matches the unfused path: gate and up are rounded to the output dtype
as the GEMM writes them, then silu and the product as ``elementwise.silu_mul``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# (block_m, block_n, block_k, num_stages, num_warps, group_m); block_n is per accumulator (gate, up):
# the fastest of bench.fused_mlp's sweep on an H100 (bench/RESULTS.md)
DEFAULT_CONFIG = (128, 128, 64, 3, 8, 16)
KEYS = ("block_m", "block_n", "block_k", "num_stages", "num_warps", "group_m")
CONFIG_OVERRIDE: dict[str, int] = {}  # bench.fused_mlp's sweep: KEYS -> value


@triton.jit
def _gate_up_silu_kernel(x_desc, w_desc, out_desc, M, N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    # this program's output tile, tiles taken in groups of GROUP_M rows
    tile = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    rows = min(num_m - first_m, GROUP_M)
    om = (first_m + (tile % per_group) % rows) * BLOCK_M
    on = ((tile % per_group) // rows) * BLOCK_N
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        ok = ki * BLOCK_K
        a = x_desc.load([om, ok])
        acc_g = tl.dot(a, w_desc.load([on, ok]).T, acc_g)
        acc_u = tl.dot(a, w_desc.load([N + on, ok]).T, acc_u)
    dt = out_desc.dtype
    gf = acc_g.to(dt).to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(dt).to(tl.float32)
    out_desc.store([om, on], (s * acc_u.to(dt).to(tl.float32)).to(dt))


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for weight [2I, H] = [gate | up] rows (the fused projection's
    weight, no bias) and x [T, H]: [T, I] in x's dtype."""
    rows, hidden = x.shape
    n = weight.shape[0] // 2
    assert weight.shape == (2 * n, hidden) and weight.dtype == x.dtype
    assert x.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    bm, bn, bk, stages, warps, group_m = (
        CONFIG_OVERRIDE.get(k, d) for k, d in zip(KEYS, DEFAULT_CONFIG, strict=True)
    )
    _gate_up_silu_kernel[(triton.cdiv(rows, bm) * triton.cdiv(n, bn),)](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn]), rows, n, hidden,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return out
