"""The fused elementwise kernels (batchllm/kernels/elementwise.py) against the plain-torch expressions they replace.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py); on CUDA natively.
bf16 results round where torch rounds, so they match the torch path within one bf16 step (the
interpreter truncates float32 to bf16 where compiled code rounds to nearest; compiled code may
contract a multiply and an add, except in RoPE, compiled without contraction: on a GPU it gives
torch's bits); float32 results match up to the reduction order.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from batchllm.engine.model import RMSNorm
from batchllm.engine.rope import Rope, apply_rope
from batchllm.kernels.elementwise import rms_norm, rope_, rope_store, silu_mul
from batchllm.kernels.paged import store_kv
from tests.rope_tables import random_rope_table

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _torch_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 96])
def test_rms_norm(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = (3 * torch.randn(5, n, generator=g)).to(dtype).to(DEVICE)
    r = torch.randn(5, n, generator=g).to(dtype).to(DEVICE)
    w = (1 + torch.randn(n, generator=g) / 4).to(dtype).to(DEVICE)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1.6e-2}
    torch.testing.assert_close(rms_norm(x, w, 1e-5), _torch_norm(x, w, 1e-5), **tol)
    out, res = rms_norm(x, w, 1e-5, residual=r)
    torch.testing.assert_close(res, x + r, **tol)
    torch.testing.assert_close(out, _torch_norm(res, w, 1e-5), **tol)  # the norm of the sum it returned
    # strided rows (a view of a wider tensor) read correctly
    wide = torch.cat([x, x], dim=1)[:, :n]
    torch.testing.assert_close(rms_norm(wide, w, 1e-5), _torch_norm(x, w, 1e-5), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype: torch.dtype) -> None:
    gate_up = (2 * torch.randn(4, 2 * 80, generator=torch.Generator().manual_seed(1))).to(dtype).to(DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1.6e-2}
    torch.testing.assert_close(silu_mul(gate_up), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_on_a_strided_view(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, tokens = 4, 2, 16, 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype).to(DEVICE)
    table = random_rope_table(64, dim, g).to(DEVICE)
    positions = torch.tensor([0, 5, 9, 33, 63, 7], device=DEVICE)
    cs = table[positions]
    cos, sin = cs[:, None, 0].to(dtype), cs[:, None, 1].to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    want_q, want_k, v_before = apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.clone()
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1.6e-2}
    q_before = q.clone()
    fresh = rope_(q, positions, table, torch.empty(q.shape, dtype=dtype, device=DEVICE))
    assert fresh.is_contiguous() and torch.equal(q, q_before)  # out of place: q untouched
    torch.testing.assert_close(fresh, want_q, **tol)
    torch.testing.assert_close(rope_(q, positions, table), want_q, **tol)
    torch.testing.assert_close(rope_(k, positions, table), want_k, **tol)
    assert torch.equal(v, v_before)  # the values beside them untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 16), (6, 3, 32), (8, 8, 64)])
@pytest.mark.parametrize("fresh", [False, True])
def test_rope_store_is_rope_twice_then_store_kv(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, fresh: bool
) -> None:
    """The fused kernel gives the bits of the three calls it replaces: rotated queries (in place or
    fresh), keys rotated in place, keys and values at their slots (-1: skipped), the rest of the pool
    untouched; strided views of one projection output, GQA ratios 2, 2 (non-power-of-two heads) and 1."""
    g = torch.Generator().manual_seed(heads * dim)
    tokens, block, blocks = 7, 4, 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype).to(DEVICE)
    table = random_rope_table(64, dim, g).to(DEVICE)
    positions = torch.tensor([0, 5, 9, 33, 63, 7, 12], device=DEVICE)
    slots = torch.tensor([5, 17, -1, 23, 0, -1, 9], device=DEVICE)
    pool = torch.randn(2, blocks, kv_heads, block, dim, generator=g).to(DEVICE, dtype)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = t.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        return q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)

    want_qkv, want_pool = qkv.clone(), pool.clone()
    q, k, v = split(want_qkv)
    want_q = rope_(q, positions, table, torch.empty(q.shape, dtype=dtype, device=DEVICE) if fresh else None)
    store_kv(rope_(k, positions, table), v, want_pool[0], want_pool[1], slots)

    q, k, v = split(qkv)
    got_q = rope_store(
        q,
        k,
        v,
        positions,
        table,
        pool[0],
        pool[1],
        slots,
        torch.empty(q.shape, dtype=dtype, device=DEVICE) if fresh else None,
    )
    assert torch.equal(got_q, want_q) and torch.equal(pool, want_pool)
    assert torch.equal(qkv, want_qkv)  # in place: the same queries (unless fresh) and keys; values untouched
    assert (got_q.data_ptr() == q.data_ptr()) != fresh


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_gives_torchs_bits_on_the_gpu(dtype: torch.dtype) -> None:
    """Compiled without multiply-add contraction, the kernel rounds each product as ``apply_rope`` does:
    the same bits at the model's shape (compiled with contraction, its PTX fuses them into bf16 FMAs)."""
    g = torch.Generator().manual_seed(5)
    tokens, heads, dim = 2048, 8, 128
    x = torch.randn(tokens, heads, dim, generator=g).to(dtype).cuda()
    table = random_rope_table(4096, dim, g).cuda()
    positions = torch.randint(0, 4096, (tokens,), generator=g).cuda()
    cs = table[positions]
    want = apply_rope(x, cs[:, None, 0].to(dtype), cs[:, None, 1].to(dtype))
    assert torch.equal(rope_(x.clone(), positions, table), want)


def test_model_modules_take_the_fused_path() -> None:
    norm = RMSNorm(32, 1e-6).to(DEVICE)
    x, r = torch.randn(3, 32, device=DEVICE), torch.randn(3, 32, device=DEVICE)
    plain_out, plain_res = norm(x, r)
    norm.fused = True
    fused_out, fused_res = norm(x, r)
    assert torch.equal(plain_res, fused_res)
    torch.testing.assert_close(fused_out, plain_out, atol=1e-5, rtol=1e-5)
    table = torch.randn(8, 2, 8).repeat(1, 1, 2).to(DEVICE)
    pos = torch.tensor([3, 1, 7], device=DEVICE)
    xq = torch.randn(3, 2, 16, device=DEVICE)
    want = Rope(table, pos, xq.dtype, fused=False)(xq.clone())
    torch.testing.assert_close(Rope(table, pos, xq.dtype, fused=True)(xq.clone()), want, atol=1e-6, rtol=1e-5)


def test_rms_norm_with_a_float32_residual() -> None:
    """bf16 activations into a float32 residual stream: the sum stays float32, the normed output bf16,
    as the torch path (``RMSNorm`` with a float32 residual) computes them."""
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(5, 96, generator=g)).to(torch.bfloat16).to(DEVICE)
    r = (torch.randn(5, 96, generator=g) / 3).to(DEVICE)  # float32, bits below bf16's precision
    norm = RMSNorm(96, 1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(96, generator=g) / 4)
    norm = norm.to(torch.bfloat16)
    out, res = rms_norm(x, norm.weight, 1e-5, residual=r)
    assert res.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(res, x.float() + r, atol=1e-6, rtol=1e-6)  # not rounded to bf16
    want_out, want_res = norm(x, r)
    torch.testing.assert_close(res, want_res, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, want_out, atol=2e-2, rtol=1.6e-2)
