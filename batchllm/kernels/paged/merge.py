"""merge_attention: two partial attention results over disjoint keys, combined through their lse."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
