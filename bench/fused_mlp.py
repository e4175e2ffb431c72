"""The MLP's gate/up projection on the GPU: cuBLAS GEMM + SiLU-and-mul against the fused kernel.

Per row count (a prefill step's tokens), Llama-3.1-8B's shapes (hidden 4096,
intermediate 14336, bf16): the unfused path (``F.linear`` to [T, 2I], then
``elementwise.silu_mul``), the GEMM alone, and ``kernels.gate_up.gate_up_silu``
under its default tiles and, with ``--sweep``, other tile configurations. Each
is checked against the unfused output first (max error, share of equal
elements), then timed as a CUDA graph of ``--iters`` calls (sustained, as a
run sees it). TFLOP/s count the GEMM's 2 x T x 4096 x 28672 FLOPs.

    python -m bench.fused_mlp [--rows 16384,12288,8192] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from batchllm.kernels import gate_up as gu
from batchllm.kernels.elementwise import silu_mul
from bench.attention import time_ms

HIDDEN, INTERMEDIATE = 4096, 14336
# block_m, block_n (per half), block_k, num_stages, num_warps, group_m, persistent
SWEEP = [
    (128, 128, 64, 3, 8, 8, 1),
    (128, 128, 64, 3, 8, 4, 0),
    (128, 128, 64, 3, 8, 16, 0),
    (128, 128, 64, 3, 8, 1, 0),
    (128, 128, 64, 4, 8, 8, 0),
    (128, 128, 128, 2, 8, 8, 0),
    (128, 64, 64, 4, 8, 8, 0),
    (256, 128, 64, 3, 16, 8, 0),
    (128, 256, 64, 2, 16, 8, 0),
]
KEYS = ("block_m", "block_n", "block_k", "num_stages", "num_warps", "group_m", "persistent")


def measure(rows: int, iters: int, sweep: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * INTERMEDIATE, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16) / 64
    flops = 2 * rows * HIDDEN * 2 * INTERMEDIATE
    ref = silu_mul(F.linear(x, w))

    def timed(name: str, fn, check: bool = True) -> dict:
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

    runs = [
        timed("cublas+silu_mul", lambda: silu_mul(F.linear(x, w))),
        timed("cublas gemm only", lambda: F.linear(x, w), check=False),
        timed("fused default", lambda: gu.gate_up_silu(x, w)),
    ]
    for cfg in SWEEP if sweep else []:
        gu.CONFIG_OVERRIDE.clear()
        gu.CONFIG_OVERRIDE.update(zip(KEYS, cfg, strict=True))
        runs.append(timed(f"fused {cfg}", lambda: gu.gate_up_silu(x, w)))
    gu.CONFIG_OVERRIDE.clear()
    if sweep:  # the GPU's clock drifts over a sweep: the baselines again at its end
        runs.append(timed("cublas+silu_mul again", lambda: silu_mul(F.linear(x, w))))
        runs.append(timed("fused default again", lambda: gu.gate_up_silu(x, w)))
    return {"rows": rows, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="16384,12288,8192")
    ap.add_argument("--iters", type=int, default=10)
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
