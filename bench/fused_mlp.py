"""The MLP's gate/up projection on the GPU: cuBLAS GEMM + SiLU-and-mul against the fused kernel.

Per row count (a prefill step's tokens), Llama-3.1-8B's shapes (hidden 4096,
intermediate 14336, bf16): the unfused path (``F.linear`` to [T, 2I], then
``elementwise.silu_mul``), the GEMM alone, and ``kernels.gate_up.gate_up_silu``
under its default tiles and, with ``--sweep``, other tile configurations. Each
is checked against the unfused output first (max error, share of equal
elements), then timed as a CUDA graph of ``--iters`` calls (sustained, as a run
sees it); a sweep times the baselines again at its end (the GPU's clock
drifts). TFLOP/s count the GEMM's 2 x T x 4096 x 28672 FLOPs.

    python -m bench.fused_mlp [--rows 16384,12288] [--sweep] [--json out.json]
    python -m bench.fused_mlp --rows 448,512,1600 --sweep   # decode sizes: would the epilogue pay there?
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from batchllm.kernels import gate_up as gu
from batchllm.kernels.elementwise import silu_mul
from bench.attention import time_ms

HIDDEN, INTERMEDIATE = 4096, 14336
SWEEP = [  # gate_up.KEYS; the 64-row tiles for decode sizes (448-1,600 rows: fewer idle tile rows)
    (128, 128, 64, 3, 8, 8),
    (128, 128, 64, 3, 8, 32),
    (128, 128, 64, 4, 8, 16),
    (128, 64, 64, 4, 8, 16),
    (64, 128, 64, 4, 4, 8),
    (64, 64, 64, 4, 4, 8),
]


def measure(rows: int, iters: int, sweep: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * INTERMEDIATE, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16) / 64
    flops = 2 * rows * HIDDEN * 2 * INTERMEDIATE

    def unfused() -> torch.Tensor:
        return silu_mul(F.linear(x, w))

    ref = unfused()

    def timed(name: str, fn: Callable[[], torch.Tensor], check: bool = True) -> dict:
        try:
            out = fn()
            torch.cuda.synchronize()
            r: dict = {"name": name}
            if check:
                r["max_err"] = float((out.float() - ref.float()).abs().max())
                r["equal"] = float((out == ref).float().mean())
            ms, how = time_ms(fn, iters)
        except Exception as e:  # a configuration the compiler or the GPU refuses
            return {"name": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        return {**r, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "timing": how}

    def fused() -> torch.Tensor:
        return gu.gate_up_silu(x, w)

    runs = [timed("unfused", unfused), timed("cublas gemm only", lambda: F.linear(x, w), False)]
    runs.append(timed("fused default", fused))
    for cfg in SWEEP if sweep else []:
        gu.CONFIG_OVERRIDE.clear()
        gu.CONFIG_OVERRIDE.update(zip(gu.KEYS, cfg, strict=True))
        runs.append(timed(f"fused {cfg}", fused))
    gu.CONFIG_OVERRIDE.clear()
    if sweep:
        runs += [timed("unfused again", unfused), timed("fused default again", fused)]
    return {"rows": rows, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="16384,12288")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    report = {"device": torch.cuda.get_device_name(), "cases": []}
    for rows in (int(r) for r in args.rows.split(",")):
        case = measure(rows, args.iters, args.sweep)
        report["cases"].append(case)
        for r in case["runs"]:
            print(rows, json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
