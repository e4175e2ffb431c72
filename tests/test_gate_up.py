"""The gate/up projection with SiLU-and-mul in its GEMM's epilogue (kernels/gate_up.py) against the
unfused path, and when the MLP takes it.

Without CUDA it runs in Triton's interpreter (float32: the interpreter's bf16
dot is not exact) at tiny tiles; with CUDA the same cases run natively (TF32
tolerance), and the `gpu` cases run bf16 at the model's shapes and tiles.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from batchllm.kernels import gate_up as gu
from batchllm.kernels.elementwise import silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 5e-3  # CUDA: float32 dots in TF32


@pytest.fixture
def tiles(monkeypatch):
    def use(**config: int) -> None:
        monkeypatch.setattr(gu, "CONFIG_OVERRIDE", dict(config))

    return use


def _unfused_gate_up(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The model's unfused path: the gate/up GEMM's output, rounded to its dtype, then silu(gate) * up."""
    return silu_mul((x.float() @ w.float().T).to(x.dtype))


@pytest.mark.parametrize("rows", [1, 37, 96])
def test_gate_up_silu_matches_the_unfused_path(tiles, rows: int) -> None:
    """Partial tiles in every dimension (rows, intermediate 40 of 16-column tiles, hidden 40 of 16-deep
    steps) and several row groups of the tile order (group_m 2 over up to 6 row tiles)."""
    tiles(block_m=16, block_n=16, block_k=16, group_m=2)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 40, generator=gen).to(DEVICE)
    w = (torch.randn(80, 40, generator=gen) / 6).to(DEVICE)  # [gate 40 | up 40] rows
    got = gu.gate_up_silu(x, w)
    assert got.shape == (rows, 40)
    torch.testing.assert_close(got, _unfused_gate_up(x, w), atol=TOL, rtol=TOL)
    gate, up = (x @ w.T).chunk(2, -1)  # and what it means, in plain torch
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, atol=TOL, rtol=TOL)


def test_gate_up_silu_takes_no_rows() -> None:
    x = torch.zeros(0, 32, device=DEVICE)
    assert gu.gate_up_silu(x, torch.zeros(64, 32, device=DEVICE)).shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [5, 1000, 4096])
def test_gpu_gate_up_silu_in_bf16(rows: int) -> None:
    """bf16 at the model's tile sizes: each element as the unfused path gives it, or one bf16 step away
    (the GEMMs sum in a different order)."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * 1408, 4096, generator=gen, device="cuda", dtype=torch.bfloat16) / 64
    got = gu.gate_up_silu(x, w)
    ref = silu_mul(torch.nn.functional.linear(x, w))
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=1.6e-2)
    assert (got == ref).float().mean() > 0.95


def _mlp(bias: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32, hidden: int = 256):
    from batchllm.engine.model import MLP

    cfg = SimpleNamespace(hidden_size=hidden, intermediate_size=512, mlp_bias=bias)
    return MLP(cfg).to(device, dtype)  # type: ignore[arg-type]


def test_the_mlp_takes_the_fused_gemm_for_prefill_sized_16_bit_steps(monkeypatch) -> None:
    from batchllm.engine import model

    bf16 = torch.bfloat16
    mlp = _mlp(dtype=bf16)
    rows = mlp.GEMM_EPILOGUE_MIN_ROWS
    mlp.fused = True
    x = torch.zeros(rows, 256, dtype=bf16)
    assert not model.has_tma(x.device) and not mlp.gemm_epilogue(x)  # a CPU (or pre-Hopper GPU): no TMA
    monkeypatch.setattr(model, "has_tma", lambda device: True)
    assert mlp.gemm_epilogue(x)
    assert not mlp.gemm_epilogue(x[: rows - 1])  # decode-sized steps: cuBLAS, then silu_mul
    assert not mlp.gemm_epilogue(x.float())  # float32 computes as the CPU does
    assert not mlp.gemm_epilogue(torch.zeros(rows, 260, dtype=bf16)[:, 2:258])  # unaligned rows
    assert not mlp.gemm_epilogue(torch.zeros(rows, 264, dtype=bf16)[:, 4:260])  # unaligned start
    odd = _mlp(hidden=252, dtype=bf16)  # rows of 504 bytes: TMA needs 16-byte multiples
    odd.fused = True
    assert not odd.gemm_epilogue(torch.zeros(rows, 252, dtype=bf16))
    biased = _mlp(bias=True, dtype=bf16)
    biased.fused = True
    assert not biased.gemm_epilogue(x)
    wide = _mlp(dtype=torch.float32)  # weights of another dtype than x's
    wide.fused = True
    assert not wide.gemm_epilogue(x)
    with torch.no_grad():  # a weight TMA cannot read: a transposed view
        mlp.gate_up_proj.weight = torch.nn.Parameter(torch.zeros(256, 1024, dtype=bf16).t())
    assert not mlp.gemm_epilogue(x)
    mlp.fused = False
    assert not mlp.gemm_epilogue(x)


@pytest.mark.gpu
def test_gpu_mlp_with_the_fused_gemm_matches_the_unfused_mlp() -> None:
    torch.manual_seed(0)
    mlp = _mlp(device="cuda", dtype=torch.bfloat16)
    mlp.fused = True
    x = torch.randn(mlp.GEMM_EPILOGUE_MIN_ROWS, 256, device="cuda", dtype=torch.bfloat16)
    assert mlp.gemm_epilogue(x) == (torch.cuda.get_device_capability()[0] >= 9)
    fused = mlp(x)
    mlp.GEMM_EPILOGUE_MIN_ROWS = 1 << 30
    torch.testing.assert_close(fused.float(), mlp(x).float(), atol=2e-2, rtol=2e-2)
