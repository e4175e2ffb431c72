"""Could a decode step hide its attention under its GEMMs? One layer of Llama-3.1-8B decode on the GPU.

A decode step alternates compute-bound GEMMs (QKV, output projection, gate/up,
down) with memory-bound two-level attention, one after the other because each
needs the last one's output. Split the step's groups into two halves and one
half's attention could run beside the other half's GEMMs (two streams). This
measures whether the GPU overlaps them, per layer, in ms (CUDA graphs):

- gemm / attn: the layer's GEMMs (+ SiLU-and-mul) and its two-level attention, all rows;
- serial = gemm + attn: what a step pays per layer now;
- overlap: gemm on one stream beside attn on another, all rows (an upper bound of any overlap);
- gemm_half / attn_half: the same for half of the groups;
- overlap_half: gemm_half on one stream beside attn_half on another;
- halves = 2 x overlap_half, scaled by rows / (2 x half's rows) where the groups do not split
  evenly: a layer of the step run as two interleaved halves;
- chain: LAYERS layers of two halves on two streams, each half its own order (attention then GEMMs
  for one, GEMMs then attention for the other, so one half's attention meets the other's GEMMs),
  per layer, scaled as halves;
- pingpong: the same, the halves held in step: phases joined across the streams, so each phase is
  one half's attention beside the other's GEMMs (what a decode step split in two would run).

`--carveout 0,16,24` repeats every case with the GEMMs told to leave that many SMs free (cuBLASLt's
SM count target, torch's experimental carveout; 0: none): a GEMM that fills every SM leaves the
attention kernel no room to run beside it. The closing table sets each run's overlapped layer against
the serial layer without a carveout (below 1: a decode step split in two halves would gain).

Cases: `a900` is (a)'s decode step at 900k KV (100 groups x 16 members, P=2000,
304 own tokens); `a205` the step at 205k KV (27 groups of 16, 256 own tokens).

    python -m bench.overlap [--json out.json] [--cases a900,a205] [--carveout 0,16,24]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.attention import build, ours, time_ms
from bench.gemm import SHAPES

HIDDEN = SHAPES["o"][0]
CASES = {"a900": (100, 16, 2000, 304), "a205": (27, 16, 2000, 256)}
LAYERS = 8


def layer_gemms(rows: int, weights: dict[str, torch.Tensor]):
    """The GEMMs of one decoder layer for `rows` tokens (inputs are fixed random rows: only the time
    matters), with SiLU-and-mul between gate/up and down as the model runs it."""
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def run() -> None:
        F.linear(x, weights["qkv"])
        F.linear(x, weights["o"])
        gate, up = F.linear(x, weights["gate_up"]).chunk(2, dim=-1)
        F.linear(F.silu(gate) * up, weights["down"])

    return run


def beside(first, second):
    """first on a side stream, second on the current one, joined: their kernels may share the GPU."""
    side = torch.cuda.Stream()

    def run() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first()
        second()
        torch.cuda.current_stream().wait_stream(side)

    return run


def chain(gemm_a, attn_a, gemm_b, attn_b):
    """LAYERS layers of half a (attention, then GEMMs) on a side stream beside half b (GEMMs, then
    attention) on the current one: the two halves stay out of step."""
    side = torch.cuda.Stream()

    def run() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(LAYERS):
                attn_a()
                gemm_a()
        for _ in range(LAYERS):
            gemm_b()
            attn_b()
        torch.cuda.current_stream().wait_stream(side)

    return run


def pingpong(gemm_a, attn_a, gemm_b, attn_b):
    """LAYERS layers of two halves in joined phases: a's attention beside b's GEMMs, then a's GEMMs
    beside b's attention (each half keeps its own order: GEMMs, then attention on their output)."""
    side = torch.cuda.Stream()

    def run() -> None:
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        for _ in range(LAYERS):
            for on_main, on_side in ((attn_a, gemm_b), (gemm_a, attn_b)):
                with torch.cuda.stream(side):
                    on_side()
                on_main()
                main.wait_stream(side)
                side.wait_stream(main)
        main.wait_stream(side)

    return run


def run_case(name: str, iters: int, weights: dict[str, torch.Tensor]) -> dict:
    groups, members, prefix, own = CASES[name]
    full, half = build(groups, members, prefix, own), build(groups // 2, members, prefix, own, seed=1)
    rows, half_rows = groups * members, (groups // 2) * members
    fns = {
        "gemm": layer_gemms(rows, weights),
        "attn": ours(full)["two_level"],
        "gemm_half": layer_gemms(half_rows, weights),
        "attn_half": ours(half)["two_level"],
    }
    fns["overlap_half"] = beside(fns["gemm_half"], fns["attn_half"])
    fns["overlap"] = beside(fns["gemm"], fns["attn"])
    other = build(groups // 2, members, prefix, own, seed=2)
    halves = (fns["gemm_half"], fns["attn_half"], layer_gemms(half_rows, weights), ours(other)["two_level"])
    fns["chain"], fns["pingpong"] = chain(*halves), pingpong(*halves)
    ms = {op: round(time_ms(fn, iters)[0], 4) for op, fn in fns.items()}
    ms["serial"] = round(ms["gemm"] + ms["attn"], 4)
    for op in ("chain", "pingpong"):
        ms[op] = round(ms[op] / LAYERS * rows / (2 * half_rows), 4)
        ms[f"{op}_vs_serial"] = round(ms[op] / ms["serial"], 3)
    ms["halves"] = round(2 * ms["overlap_half"] * rows / (2 * half_rows), 4)
    ms["halves_vs_serial"] = round(ms["halves"] / ms["serial"], 3)
    flops = sum(2 * rows * n * k for n, k in SHAPES.values())
    ms["gemm_tflops"] = round(flops / (ms["gemm"] * 1e-3) / 1e12, 1)
    res = {"G": groups, "sd": members, "P": prefix, "S": own, "rows": rows, "ms": ms}
    print(f"# {name} {json.dumps(res)}", flush=True)
    return res


def against_uncarved(cases: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each run's overlapped layer (halves, chain, pingpong) against the serial layer *without* a
    carveout: what a decode step would pay against what it pays now (a carveout slows the GEMMs, so a
    ratio against its own serial layer flatters it). Keys are "case/carveout=N"; only cases whose sweep
    includes carveout 0 are compared."""
    out: dict[str, dict[str, float]] = {}
    for key, res in cases.items():
        name = key.split("/")[0]
        base = cases.get(f"{name}/carveout=0")
        if base is None:
            continue
        serial = base["ms"]["serial"]
        out[key] = {op: round(res["ms"][op] / serial, 3) for op in ("halves", "chain", "pingpong")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--cases", default="a900,a205", help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--iters", type=int, default=10, help="layers per timed graph")
    ap.add_argument("--carveout", default="0", help="comma list of SMs the GEMMs leave free (0: none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.overlap needs a CUDA device")
        return 2
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    weights = {k: torch.randn(s, **bf16) * 0.02 for k, s in SHAPES.items()}
    out = {"device": torch.cuda.get_device_name(), "cases": {}}
    for carveout in (int(c) for c in args.carveout.split(",")):
        torch._C._set_sm_carveout_experimental(carveout or None)
        torch.backends.cuda.preferred_blas_library("cublaslt" if carveout else "cublas")
        for name in args.cases.split(","):
            print(f"# carveout {carveout}", flush=True)
            out["cases"][f"{name}/carveout={carveout}"] = run_case(name, args.iters, weights)
    out["vs_uncarved_serial"] = against_uncarved(out["cases"])
    print("| case / carveout | halves | chain | pingpong |  (layer ms / serial layer ms without carveout)")
    print("|---|---|---|---|")
    for key, r in out["vs_uncarved_serial"].items():
        print(f"| {key} | {r['halves']} | {r['chain']} | {r['pingpong']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
