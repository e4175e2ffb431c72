"""Projections with their elementwise work in the GEMM's epilogue (kernels/projections.py) against the
unfused path: gate/up + SiLU-and-mul, QKV + RoPE.

Without CUDA they run in Triton's interpreter (float32: the interpreter's bf16
dot is not exact) at tiny tiles; with CUDA the same cases run natively (TF32
tolerance), and the `gpu` cases run bf16 at the model's shapes and tiles.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from batchllm.kernels import projections as proj
from batchllm.kernels.elementwise import rope_, silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 5e-3  # CUDA: float32 dots in TF32


@pytest.fixture
def tiles(monkeypatch):
    def use(name: str, **config: int) -> None:
        monkeypatch.setitem(proj.CONFIG_OVERRIDE, name, dict(config))

    return use


# ---- gate/up + SiLU-and-mul


def _unfused_gate_up(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The model's unfused path: the gate/up GEMM's output, rounded to its dtype, then silu(gate) * up."""
    return silu_mul((x.float() @ w.float().T).to(x.dtype))


@pytest.mark.parametrize("rows", [1, 37, 96])
def test_gate_up_silu_matches_the_unfused_path(tiles, rows: int) -> None:
    """Partial tiles in every dimension (rows, intermediate 40 of 16-column tiles, hidden 40 of 16-deep
    steps) and several row groups of the tile order (group_m 2 over up to 6 row tiles)."""
    tiles("gate_up", block_m=16, block_n=16, block_k=16, group_m=2)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 40, generator=gen).to(DEVICE)
    w = (torch.randn(80, 40, generator=gen) / 6).to(DEVICE)  # [gate 40 | up 40] rows
    got = proj.gate_up_silu(x, w)
    assert got.shape == (rows, 40)
    torch.testing.assert_close(got, _unfused_gate_up(x, w), atol=TOL, rtol=TOL)
    gate, up = (x @ w.T).chunk(2, -1)  # and what it means, in plain torch
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, atol=TOL, rtol=TOL)


def test_projections_take_no_rows() -> None:
    x = torch.zeros(0, 32, device=DEVICE)
    assert proj.gate_up_silu(x, torch.zeros(64, 32, device=DEVICE)).shape == (0, 32)
    table = torch.zeros(8, 2, 16, device=DEVICE)
    q, kv = proj.qkv_rope(
        x, torch.zeros(64, 32, device=DEVICE), None, torch.zeros(0, device=DEVICE), table, 2, 1
    )
    assert q.shape == (0, 32) and kv.shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [5, 1000, 4096])
def test_gpu_gate_up_silu_in_bf16(rows: int) -> None:
    """bf16 at the model's tile sizes: each element as the unfused path gives it, or one bf16 step away
    (the GEMMs sum in a different order)."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * 1408, 4096, generator=gen, device="cuda", dtype=torch.bfloat16) / 64
    got = proj.gate_up_silu(x, w)
    ref = silu_mul(torch.nn.functional.linear(x, w))
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=1.6e-2)
    assert (got == ref).float().mean() > 0.95


# ---- QKV + RoPE


def _unfused_qkv(x, w, bias, positions, table, heads, kv_heads):
    """The model's unfused path: the QKV GEMM (rounded), then RoPE on queries and keys."""
    dim = table.shape[2]
    qkv = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q = rope_(q.reshape(-1, heads, dim).clone(), positions, table)
    k = rope_(k.reshape(-1, kv_heads, dim).clone(), positions, table)
    return q.flatten(1), torch.cat([k.flatten(1), v], -1)


def _table(max_len: int, dim: int, device: str) -> torch.Tensor:
    from batchllm.engine.rope import rope_table

    cfg = SimpleNamespace(head_dim=dim, rope_theta=10_000.0, rope_scaling=None)
    return rope_table(cfg, max_len, device)  # type: ignore[arg-type]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [3, 37])
def test_qkv_rope_matches_the_unfused_path(tiles, rows: int, bias: bool) -> None:
    """4 query heads, 2 KV heads of 32 (halves of 16: one accumulator each), partial row and K tiles,
    positions out of order (a step's chunks), with and without a bias."""
    tiles("qkv", block_m=16, block_k=16, group_m=2)
    gen = torch.Generator().manual_seed(rows)
    heads, kv_heads, dim, hidden = 4, 2, 32, 40
    x = torch.randn(rows, hidden, generator=gen).to(DEVICE)
    w = (torch.randn((heads + 2 * kv_heads) * dim, hidden, generator=gen) / 6).to(DEVICE)
    b = torch.randn(w.shape[0], generator=gen).to(DEVICE) if bias else None
    positions = torch.randperm(64, generator=gen)[:rows].to(DEVICE)
    table = _table(64, dim, DEVICE)
    q, kv = proj.qkv_rope(x, w, b, positions, table, heads, kv_heads)
    ref_q, ref_kv = _unfused_qkv(x, w, b, positions, table, heads, kv_heads)
    assert q.is_contiguous() and kv.is_contiguous()
    torch.testing.assert_close(q, ref_q, atol=TOL, rtol=TOL)
    torch.testing.assert_close(kv, ref_kv, atol=TOL, rtol=TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("rows", [5, 4096])
def test_gpu_qkv_rope_in_bf16(rows: int, dim: int) -> None:
    """bf16, 32 query and 8 KV heads, head_dim 64 and 128, with a bias, against the unfused path."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    heads, kv_heads, hidden = 32, 8, 4096
    x = torch.randn(rows, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = (
        torch.randn((heads + 2 * kv_heads) * dim, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
        / 64
    )
    b = torch.randn(w.shape[0], generator=gen, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 8192, (rows,), generator=gen, device="cuda")
    table = _table(8192, dim, "cuda")
    q, kv = proj.qkv_rope(x, w, b, positions, table, heads, kv_heads)
    qkv = torch.nn.functional.linear(x, w, b)
    qs, ks, vs = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    ref_q = rope_(qs.reshape(rows, heads, dim).clone(), positions, table).flatten(1)
    ref_k = rope_(ks.reshape(rows, kv_heads, dim).clone(), positions, table).flatten(1)
    for got, ref in ((q, ref_q), (kv, torch.cat([ref_k, vs], -1))):
        torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=1.6e-2)
        assert (got == ref).float().mean() > 0.95


# ---- the model's choice


def _mlp(bias: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32, hidden: int = 256):
    from batchllm.engine.model import MLP

    cfg = SimpleNamespace(hidden_size=hidden, intermediate_size=512, mlp_bias=bias)
    return MLP(cfg).to(device, dtype)  # type: ignore[arg-type]


def test_the_mlp_takes_the_fused_gemm_for_prefill_sized_16_bit_steps() -> None:
    mlp, rows = _mlp(), 4096
    mlp.fused = True
    x = torch.zeros(rows, 256, dtype=torch.bfloat16)
    assert mlp.gemm_epilogue(x)
    assert not mlp.gemm_epilogue(x[: rows - 1])  # decode-sized steps: cuBLAS, then silu_mul
    assert not mlp.gemm_epilogue(x.float())  # float32 computes as the CPU does
    assert not mlp.gemm_epilogue(torch.zeros(rows, 260, dtype=torch.bfloat16)[:, 2:258])  # unaligned rows
    assert not mlp.gemm_epilogue(torch.zeros(rows, 264, dtype=torch.bfloat16)[:, 4:260])  # unaligned start
    odd = _mlp(hidden=252)  # rows of 504 bytes: TMA needs 16-byte multiples
    odd.fused = True
    assert not odd.gemm_epilogue(torch.zeros(rows, 252, dtype=torch.bfloat16))
    biased = _mlp(bias=True)
    biased.fused = True
    assert not biased.gemm_epilogue(x)
    mlp.fused = False
    assert not mlp.gemm_epilogue(x)


@pytest.mark.gpu
def test_gpu_mlp_with_the_fused_gemm_matches_the_unfused_mlp() -> None:
    torch.manual_seed(0)
    mlp = _mlp(device="cuda", dtype=torch.bfloat16)
    mlp.fused = True
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    assert mlp.gemm_epilogue(x)
    fused = mlp(x)
    mlp.GEMM_EPILOGUE_MIN_ROWS = 1 << 30
    torch.testing.assert_close(fused.float(), mlp(x).float(), atol=2e-2, rtol=2e-2)


def _attention(device: str = "cpu", qk_norm: bool = False, head_dim: int = 128):
    from batchllm.engine.model import Attention

    cfg = SimpleNamespace(
        num_heads=32, num_kv_heads=8, head_dim=head_dim, hidden_size=4096, qkv_bias=True, o_bias=False,
        qk_norm=qk_norm, rms_norm_eps=1e-5,
    )  # fmt: skip
    return Attention(cfg, 0).to(device, torch.bfloat16)  # type: ignore[arg-type]


def _rope(rows: int, device: str, fused: bool = True, head_dim: int = 128):
    from batchllm.engine.rope import Rope

    table = _table(8192, head_dim, device)
    positions = torch.randint(0, 8192, (rows,), generator=torch.Generator().manual_seed(1)).to(device)
    return Rope(table, positions, torch.bfloat16, fused)


def test_attention_takes_the_fused_qkv_gemm_for_prefill_sized_16_bit_steps() -> None:
    attn, rows = _attention(), 4096
    x = torch.zeros(rows, 4096, dtype=torch.bfloat16)
    assert attn.gemm_epilogue(x, _rope(rows, "cpu"))
    assert not attn.gemm_epilogue(x[:-1], _rope(rows - 1, "cpu"))  # decode-sized: cuBLAS, then RoPE
    assert not attn.gemm_epilogue(x, _rope(rows, "cpu", fused=False))  # fused kernels off
    assert not attn.gemm_epilogue(x.float(), _rope(rows, "cpu"))
    assert not _attention(qk_norm=True).gemm_epilogue(x, _rope(rows, "cpu"))  # the norm comes between
    assert not _attention(head_dim=16).gemm_epilogue(x, _rope(rows, "cpu", head_dim=16))  # 8-column halves


class _Recorder:
    """An attention backend that keeps what the projection handed it and attends to nothing."""

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: object) -> None:
        self.k, self.v = k.clone(), v.clone()

    def forward(self, layer: int, q: torch.Tensor, meta: object, scale: float) -> torch.Tensor:
        self.q = q.clone()
        return q


@pytest.mark.gpu
def test_gpu_attention_with_the_fused_qkv_gemm_hands_over_what_the_unfused_path_does() -> None:
    """Queries, keys and values as the backend receives them, fused (QKV GEMM with RoPE, bias) and
    unfused (cuBLAS, then the RoPE kernel), 4,096 rows, Llama-3.1-8B heads."""
    torch.manual_seed(0)
    attn, rows = _attention("cuda"), 4096
    with torch.no_grad():
        attn.qkv_proj.weight.normal_(0, 1 / 64)
        attn.qkv_proj.bias.normal_(0, 1)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    rope, fused, plain = _rope(rows, "cuda"), _Recorder(), _Recorder()
    assert attn.gemm_epilogue(x, rope)
    attn(rope, x, None, kv=(fused, 0))
    attn.GEMM_EPILOGUE_MIN_ROWS = 1 << 30
    attn(rope, x, None, kv=(plain, 0))
    for a, b in ((fused.q, plain.q), (fused.k, plain.k), (fused.v, plain.v)):
        assert a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=1.6e-2)
        assert (a == b).float().mean() > 0.95
