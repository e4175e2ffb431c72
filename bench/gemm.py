"""How fast the GPU runs the model's projections, by rows per step and BLAS library (TFLOP/s).

Prefill steps and decode steps spend most of their time in four GEMMs per layer
(Llama-3.1-8B: QKV 4096->6144, output 4096->4096, gate/up 4096->28672, down
14336->4096). Their rate depends on the rows of a step (tile and wave
quantization) and on which cuBLAS path torch takes. This times one layer's four
GEMMs, repeated in a CUDA graph (sustained, as a run sees them), at each row
count and library, beside the square 8192^3 product that bench.floor calls
the peak (best of 10 single products, a burst).

    python -m bench.gemm [--json out.json] [--rows 432,800,1600,...] [--libs cublas,cublaslt]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.attention import time_ms
from bench.floor import measure_peak

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LM_HEAD = (128256, 4096)


def parse_rows(text: str) -> list[int]:
    """'432,512' or 'start:stop:step' ranges (stop included), mixed: '256:2048:32,4096'."""
    rows: list[int] = []
    for part in text.split(","):
        if ":" in part:
            start, stop, step = (int(x) for x in part.split(":"))
            rows += range(start, stop + 1, step)
        else:
            rows.append(int(part))
    return rows


def layer_rate(rows: int, weights: dict[str, torch.Tensor], iters: int) -> dict[str, float | str]:
    """TFLOP/s of each projection and of a layer's four together at `rows` rows (the output head, once
    per step, is not part of the layer)."""
    out: dict[str, float | str] = {}
    total_flops, total_ms = 0.0, 0.0
    for name, w in weights.items():
        x = torch.randn(rows, w.shape[1], device="cuda", dtype=torch.bfloat16)
        ms, how = time_ms(lambda x=x, w=w: F.linear(x, w), iters)
        flops = 2 * rows * w.shape[0] * w.shape[1]
        out[name] = round(flops / ms / 1e9, 1)
        if how != "cuda_graph":
            out[f"{name}_timing"] = how  # eager: includes launch gaps
        if name in SHAPES:
            total_flops, total_ms = total_flops + flops, total_ms + ms
    out["layer"] = round(total_flops / total_ms / 1e9, 1)
    out["layer_ms"] = round(total_ms, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--rows", default="432,448,512,800,1600,1664,2048,4096,8192,16384,32768")
    ap.add_argument(
        "--libs", default="cublas,cublaslt", help="torch.backends.cuda.preferred_blas_library values"
    )
    ap.add_argument("--iters", type=int, default=20, help="products per timed graph")
    ap.add_argument(
        "--lm-head", action="store_true", help="also the output head (4096->128256), as decode runs it"
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gemm needs a CUDA device")
        return 2
    shapes = SHAPES | ({"lm_head": LM_HEAD} if args.lm_head else {})
    weights = {k: torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "peak_tflops": measure_peak("cuda") / 1e12,
        "libs": {},
    }
    print(f"# peak {res['peak_tflops']:.1f} TFLOP/s", flush=True)
    for lib in args.libs.split(","):
        torch.backends.cuda.preferred_blas_library(lib)
        res["libs"][lib] = {}
        for rows in parse_rows(args.rows):
            res["libs"][lib][rows] = rate = layer_rate(rows, weights, args.iters)
            print(f"# {lib} rows={rows} {json.dumps(rate)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
