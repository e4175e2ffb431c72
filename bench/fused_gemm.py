"""Projections with elementwise epilogues on the GPU: cuBLAS GEMM + our elementwise kernels against the
fused kernels of ``kernels/projections.py`` (gate/up + SiLU-and-mul, QKV + RoPE).

Per row count (a prefill step's tokens), Llama-3.1-8B's shapes (hidden 4096,
intermediate 14336, 32 query and 8 KV heads of 128, bf16): the unfused path
(``F.linear``, then ``elementwise.silu_mul`` / ``elementwise.rope_`` on queries
into a fresh tensor and on keys in place, as the model runs them), the GEMM
alone, and the fused kernel under its default tiles and, with ``--sweep``,
other tile configurations. Each is checked against the unfused output first
(max error, share of equal elements), then timed as a CUDA graph of ``--iters``
calls (sustained, as a run sees it); the baselines run again at the end of a
sweep (the GPU's clock drifts). TFLOP/s count the GEMM's FLOPs.

    python -m bench.fused_gemm [--proj gate_up,qkv] [--rows 16384,12288] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from batchllm.engine.rope import rope_table
from batchllm.kernels import projections as proj
from batchllm.kernels.elementwise import rope_, silu_mul
from bench.attention import time_ms

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, DIM = 4096, 14336, 32, 8, 128
# (block_m, block_n, block_k, num_stages, num_warps, group_m); qkv's block_n is half a head, whatever given
SWEEP = {
    "gate_up": [
        (128, 128, 64, 3, 8, 8),
        (128, 128, 64, 3, 8, 32),
        (128, 128, 64, 4, 8, 16),
        (128, 64, 64, 4, 8, 16),
    ],
    "qkv": [
        (128, 64, 64, 4, 8, 16),
        (128, 64, 64, 4, 4, 16),
        (128, 64, 64, 5, 4, 8),
        (128, 64, 128, 3, 8, 16),
        (256, 64, 64, 3, 8, 16),
        (64, 64, 64, 4, 4, 16),
    ],
}


def _gate_up(rows: int, gen: torch.Generator) -> tuple[int, Callable, Callable, Callable]:
    x = torch.randn(rows, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * INTERMEDIATE, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16) / 64
    flops = 2 * rows * HIDDEN * 2 * INTERMEDIATE
    return flops, lambda: silu_mul(F.linear(x, w)), lambda: F.linear(x, w), lambda: proj.gate_up_silu(x, w)


def _qkv(rows: int, gen: torch.Generator) -> tuple[int, Callable, Callable, Callable]:
    x = torch.randn(rows, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = (
        torch.randn((HEADS + 2 * KV_HEADS) * DIM, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16)
        / 64
    )
    cfg = SimpleNamespace(head_dim=DIM, rope_theta=500_000.0, rope_scaling=None)  # the table needs these
    table = rope_table(cfg, 8192, "cuda")  # type: ignore[arg-type]
    positions = torch.randint(0, 8192, (rows,), generator=gen, device="cuda")

    def unfused() -> torch.Tensor:
        q, k, v = F.linear(x, w).split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], -1)
        qf = rope_(q.view(rows, HEADS, DIM), positions, table, torch.empty(rows, HEADS, DIM, dtype=x.dtype,
                                                                           device="cuda"))  # fmt: skip
        kf = rope_(k.view(rows, KV_HEADS, DIM), positions, table)
        return torch.cat([qf.flatten(1), kf.flatten(1), v], 1)  # compared, not in the timed unfused path

    def fused() -> torch.Tensor:
        q, kv = proj.qkv_rope(x, w, None, positions, table, HEADS, KV_HEADS)
        return torch.cat([q, kv], 1)

    def unfused_timed() -> None:
        q, k, _ = F.linear(x, w).split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], -1)
        rope_(
            q.view(rows, HEADS, DIM),
            positions,
            table,
            torch.empty(rows, HEADS, DIM, dtype=x.dtype, device="cuda"),
        )
        rope_(k.view(rows, KV_HEADS, DIM), positions, table)

    def fused_timed() -> None:
        proj.qkv_rope(x, w, None, positions, table, HEADS, KV_HEADS)

    flops = 2 * rows * HIDDEN * (HEADS + 2 * KV_HEADS) * DIM
    unfused_timed.check, fused_timed.check = unfused, fused  # type: ignore[attr-defined]
    return flops, unfused_timed, lambda: F.linear(x, w), fused_timed


PROJECTIONS = {"gate_up": _gate_up, "qkv": _qkv}


def measure(name: str, rows: int, iters: int, sweep: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    flops, unfused, gemm, fused = PROJECTIONS[name](rows, gen)
    ref = getattr(unfused, "check", unfused)()

    def timed(label: str, fn: Callable, check: bool = True) -> dict:
        try:
            out = getattr(fn, "check", fn)()
            torch.cuda.synchronize()
            r: dict = {"name": label}
            if check:
                r["max_err"] = float((out.float() - ref.float()).abs().max())
                r["equal"] = float((out == ref).float().mean())
            ms, how = time_ms(fn, iters)
        except Exception as e:  # a configuration the compiler or the GPU refuses
            return {"name": label, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        return {**r, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "timing": how}

    runs = [
        timed("unfused", unfused),
        timed("cublas gemm only", gemm, check=False),
        timed("fused default", fused),
    ]
    for cfg in SWEEP[name] if sweep else []:
        proj.CONFIG_OVERRIDE[name] = dict(zip(proj.KEYS, cfg, strict=True))
        runs.append(timed(f"fused {cfg}", fused))
    proj.CONFIG_OVERRIDE[name] = {}
    if sweep:
        runs += [timed("unfused again", unfused), timed("fused default again", fused)]
    return {"proj": name, "rows": rows, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proj", default="gate_up,qkv")
    ap.add_argument("--rows", default="16384,12288")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    report = {"device": torch.cuda.get_device_name(), "cases": []}
    for name in args.proj.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            case = measure(name, rows, args.iters, args.sweep)
            report["cases"].append(case)
            for r in case["runs"]:
                print(name, rows, json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
