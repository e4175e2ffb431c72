"""Fused elementwise kernels of a decoder layer: residual add + RMSNorm, SiLU-and-mul, RoPE in place
(with the paged KV store of the rotated keys and the values in the same pass).

In plain torch each of these is several kernels that each read and write the
whole activation (RMSNorm alone: a float32 copy, square, mean, rsqrt, two
multiplies, a cast back); at 8192 prefill tokens of an 8B model they took a
fifth of a step's GPU time. Here each is one pass over memory.

Every kernel rounds where the torch expressions round (the model dtype after
each torch op), so bf16 results stay within a rounding step of the plain-torch
path and float32 results differ by reduction order only (on an H200 the engine
in float32 gives the CPU's greedy tokens with these kernels, bench/gpu_check.py). Reductions go through
tl.reduce with the combine functions of paged/tiles.py (interpreter-safe, see
there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged.interpreter import patch_if_interpreted
from .paged.tiles import _SUM

patch_if_interpreted()


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        s = (xf + r.to(tl.float32)).to(r.dtype)  # torch: x + residual, rounded to the residual's dtype
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=ok)
        xf = s.to(tl.float32)
    var = tl.reduce(xf * xf, 0, _SUM) / n_cols
    y = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, n] (of x + residual when given: then (normed, x + residual)).

    Same rounding as ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``. The sum
    is in the residual's dtype (a float32 residual stream beside 16-bit activations), the norm in x's.
    """
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.is_contiguous()
    rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(residual) if residual is not None else out
    res = residual if residual is not None else x
    if rows:
        _rmsnorm_kernel[(rows,)](
            x,
            res,
            weight,
            out,
            res_out,
            x.stride(0),
            res.stride(0),
            out.stride(0),
            res_out.stride(0),
            n,
            eps,
            HAS_RES=residual is not None,
            BLOCK=triton.next_power_of_2(n),
            num_warps=8 if n >= 4096 else 4,
        )
    return out if residual is None else (out, res_out)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # torch: silu(gate), rounded
    tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2n] = [gate | up] (the fused gate/up projection's output)."""
    assert gate_up.dim() == 2 and gate_up.stride(-1) == 1 and gate_up.shape[1] % 2 == 0
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
        )
    return out


@triton.jit
def _rotated(x1, x2, cos, sin):
    """Rotate-half RoPE of a head's two halves [heads, HALF] by cos/sin [HALF] (float32, cast to x's
    dtype as torch does), rounded where ``x * cos + rotate_half(x) * sin`` rounds."""
    dt = x1.dtype
    a1 = (x1.to(tl.float32) * cos[None, :]).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * cos[None, :]).to(dt).to(tl.float32)
    b1 = (-x2.to(tl.float32) * sin[None, :]).to(dt).to(tl.float32)  # rotate_half: [-x2, x1]
    b2 = (x1.to(tl.float32) * sin[None, :]).to(dt).to(tl.float32)
    return (a1 + b1).to(dt), (a2 + b2).to(dt)


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    table_ptr,
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_tp,
    stride_tc,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ch,
    stride_co,
    n_heads,
    n_kv_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    STORE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)
    # the table holds cos and sin of the full head_dim (its two halves repeat); cast as torch does
    dt = x_ptr.dtype.element_ty
    cos = tl.load(table_ptr + pos * stride_tp + d).to(dt).to(tl.float32)
    sin = tl.load(table_ptr + pos * stride_tp + stride_tc + d).to(dt).to(tl.float32)
    h = tl.arange(0, BLOCK_H)
    ok = (h < n_heads)[:, None]
    base = x_ptr + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    y1, y2 = _rotated(tl.load(base, mask=ok, other=0.0), tl.load(base + HALF, mask=ok, other=0.0), cos, sin)
    dst = out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(dst, y1, mask=ok)
    tl.store(dst + HALF, y2, mask=ok)
    if STORE:  # the keys rotated in place, then keys and values into their slot (-1: none)
        kh = tl.arange(0, BLOCK_KH)
        kok = (kh < n_kv_heads)[:, None]
        kbase = k_ptr + t * stride_kt + kh[:, None] * stride_kh + d[None, :]
        k1, k2 = _rotated(
            tl.load(kbase, mask=kok, other=0.0), tl.load(kbase + HALF, mask=kok, other=0.0), cos, sin
        )
        tl.store(kbase, k1, mask=kok)
        tl.store(kbase + HALF, k2, mask=kok)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            at = (
                (slot // BLOCK_SIZE) * stride_cb
                + (slot % BLOCK_SIZE) * stride_co
                + kh[:, None] * stride_ch
                + d[None, :]
            )
            vbase = v_ptr + t * stride_vt + kh[:, None] * stride_vh + d[None, :]
            tl.store(kc_ptr + at, k1, mask=kok)
            tl.store(kc_ptr + at + HALF, k2, mask=kok)
            tl.store(vc_ptr + at, tl.load(vbase, mask=kok), mask=kok)
            tl.store(vc_ptr + at + HALF, tl.load(vbase + HALF, mask=kok), mask=kok)


def _rope_launch(
    x: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor | None,
    kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """RoPE of x [T, heads, head_dim] into out (default x); kv: (k, v, k_cache, v_cache, slots) to
    rotate k in place and store k and v in the same launch."""
    tokens, heads, dim = x.shape
    assert x.stride(-1) == 1 and table.is_contiguous() and table.dtype == torch.float32
    assert dim >= 2 and (dim // 2) & (dim // 2 - 1) == 0 and dim % 2 == 0, (
        f"head_dim {dim}: half a power of two"
    )
    out = x if out is None else out
    assert out.shape == x.shape and out.stride(-1) == 1 and out.dtype == x.dtype
    k, v, k_cache, v_cache, slots = kv if kv is not None else (x, x, x, x, positions)
    cache_strides = k_cache.stride()[:3] if kv is not None else (0, 0, 0)  # block, kv_head, offset
    if kv is not None:
        assert (
            k.dtype == x.dtype
            and k.shape == v.shape == (tokens, k.shape[1], dim)
            and slots.shape == (tokens,)
        )
        assert k.stride(-1) == 1 and v.stride(-1) == 1
        assert (
            k_cache.shape == v_cache.shape
            and k_cache.stride() == v_cache.stride()
            and k_cache.stride(-1) == 1
            and k_cache.dtype == v_cache.dtype == k.dtype  # the pool holds the activations' dtype
        )
        assert k_cache.shape[1] == k.shape[1] and k_cache.shape[3] == dim
    if tokens:
        _rope_kernel[(tokens,)](
            x,
            out,
            positions,
            table,
            k,
            v,
            k_cache,
            v_cache,
            slots,
            x.stride(0),
            x.stride(1),
            out.stride(0),
            out.stride(1),
            table.stride(0),
            table.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            *cache_strides,
            heads,
            k.shape[1],
            HALF=dim // 2,
            BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            BLOCK_SIZE=k_cache.shape[2] if kv is not None else 1,
            STORE=kv is not None,
            num_warps=4,
            enable_fp_fusion=False,  # no a * b + c as one FMA: torch's formula rounds the product first
        )
    return out


def rope_(
    x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate-half RoPE of x [T, heads, head_dim] (x may be a strided view), in place or into `out`.

    out: where the result goes (default x). The queries take a fresh contiguous tensor: they
    are a view of the fused QKV output, and a kernel that wants plain rows (FA3) would
    otherwise copy them once per layer (1.5% of a prefill step on the H200).
    table: [max_len, 2, head_dim] float32 cos/sin by position (``rope.rope_table``).
    Same rounding as ``x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)``.
    """
    return _rope_launch(x, positions, table, out, None)


def rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A layer's ``rope_(q, out=q_out)``, ``rope_(k)`` and ``store_kv(k, v, ...)`` as one kernel, same
    results: k is rotated in place, then k and v [T, kv_heads, head_dim] go to their slots of the
    paged caches [block, kv_head, offset, head_dim] (slot -1 skips the row). One launch per layer
    instead of three, and k is read once. Returns the rotated queries."""
    return _rope_launch(q, positions, table, q_out, (k, v, k_cache, v_cache, slots))
