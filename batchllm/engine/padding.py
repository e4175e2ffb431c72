"""Padded decode sizes chosen by the measured time of the layer's GEMMs.

A decode step replays the CUDA graph of a padded batch size, so every GEMM of the
step runs at that many rows. cuBLAS's rate depends on the rows, and unevenly: on
an H200, one Llama-3.1-8B layer's four projections take 0.45 ms at 448 rows and
0.34 ms at 512 (its gate/up product falls to 350 TFLOP/s at 448 rows;
bench.gemm, bench/RESULTS.md). A step of 448 rows therefore runs faster padded
to 512. The engine times one layer's projections once per candidate size (at its
first decode step) and sends each step to the cheapest size that holds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# a larger size must be cheaper by this share and by this many seconds per layer to be chosen: the
# timings repeat within a few percent, and the projections of small models take a few microseconds
MARGIN = 0.97
MIN_SAVING_S = 2e-6
# GPU cycles to sleep before each timing (~1 ms at 2 GHz): longer than queueing a timing's launches
QUEUE_CYCLES = 2_000_000


def cheapest_sizes(
    sizes: Sequence[int], cost: dict[int, float], margin: float = MARGIN, min_saving: float = MIN_SAVING_S
) -> dict[int, int]:
    """For each size, the size to run it at: the cheapest one at least as large, where cheaper means
    below ``margin`` times the size's own cost and ``min_saving`` seconds under it (sizes without a
    cost run as they are)."""
    order = sorted(sizes)
    chosen = {}
    for i, s in enumerate(order):
        bound = min(margin * cost[s], cost[s] - min_saving) if s in cost else -math.inf
        cheaper = [t for t in order[i + 1 :] if cost.get(t, math.inf) < bound]
        chosen[s] = min(cheaper, key=cost.__getitem__, default=s)
    return chosen


def projections(layer: nn.Module) -> list[nn.Linear]:
    """The linear layers one decoder layer runs per token, in order."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]


@torch.inference_mode()
def time_projections(
    linears: Sequence[nn.Linear], sizes: Sequence[int], passes: int = 5, warm_s: float = 0.3
) -> dict[int, float]:
    """Seconds of the linears at each row count: the least of ``passes`` timings of 3 calls (CUDA
    events), after ``warm_s`` seconds of the largest size so that the clocks have left their idle
    state. Each timing starts behind a short GPU sleep, so the launches are queued before the first
    kernel runs and the kernels run back to back, as in a graph replay (small models' projections
    are shorter than a launch). Inputs are random rows of the weights' dtype: only shapes matter."""
    weight = linears[0].weight
    x = {
        lin.in_features: torch.randn(max(sizes), lin.in_features, device=weight.device, dtype=weight.dtype)
        for lin in linears
    }

    def run(rows: int) -> None:
        for lin in linears:
            lin(x[lin.in_features][:rows])

    def seconds(rows: int, calls: int = 3) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(QUEUE_CYCLES)
        start.record()
        for _ in range(calls):
            run(rows)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / (1e3 * calls)

    for s in sizes:  # cuBLAS picks and loads each shape's kernel once
        run(s)
    calls = max(1, int(warm_s / max(seconds(max(sizes)), 1e-6)))
    seconds(max(sizes), calls)
    cost: dict[int, float] = {}
    for _ in range(passes):
        for s in sizes:
            cost[s] = min(cost.get(s, float("inf")), seconds(s))
    return cost
