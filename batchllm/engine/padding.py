"""Padded decode sizes chosen by the measured time of the layer's GEMMs.

A decode step replays the CUDA graph of a padded batch size, so every GEMM of the
step runs at that many rows. cuBLAS's rate depends on the rows, and unevenly: on
an H200, one Llama-3.1-8B layer's four projections take 0.45 ms at 448 rows and
0.34 ms at 512 (its gate/up product falls to 350 TFLOP/s at 448 rows;
bench.gemm, bench/RESULTS.md). A step of 448 rows therefore runs faster padded
to 512. The engine times one layer's projections once per candidate size (at its
first decode step) and sends each step to the cheapest size that holds it.

The timing takes about a second for an 8B model (estimated: five passes over
45 sizes of ~1 ms of sleep and three calls of 0.1-1.4 ms each, plus 0.3 s of
warm-up; not measured alone), which a nightly job would pay at every start.
The costs are kept in batchllm's cache, keyed by the GPU, its software, dtype
and the projections' shapes: the same GPU and software choose the same sizes,
measured once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from batchllm.models import cache_dir

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


def cached_costs(
    linears: Sequence[nn.Linear], sizes: Sequence[int], measure: Callable[[], dict[int, float]]
) -> dict[int, float]:
    """The projections' costs at ``sizes`` as measured before on this GPU and software (batchllm's
    cache), else ``measure()``'s, stored for the next start. An entry that is unreadable or lacks a
    size is measured again; a cache that cannot be written leaves the costs unstored. A stale entry can
    only pick a slower padded size, never change a result (padding rows' outputs are dropped)."""
    weight = linears[0].weight
    dev = weight.device
    cuda = dev.type == "cuda"
    identity = {
        "method": 1,  # time_projections' way of timing: a new way invalidates the old entries
        "gpu": torch.cuda.get_device_name(dev) if cuda else dev.type,
        "sms": torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 0,  # MIG slices
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "blas": str(torch.backends.cuda.preferred_blas_library()) if cuda else "",
        "dtype": str(weight.dtype),
        "shapes": [[*lin.weight.shape, lin.bias is not None] for lin in linears],
        "sizes": list(sizes),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    try:
        path = cache_dir() / "padding" / f"{digest}.json"
        entry = json.loads(path.read_text())
        costs = {int(s): float(c) for s, c in entry["costs"].items()}
        if (
            entry["identity"] == identity
            and set(costs) == set(sizes)
            and all(map(math.isfinite, costs.values()))
        ):
            return costs
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError):
        pass  # RuntimeError: no home folder to hold the cache
    costs = measure()
    _store(digest, {"identity": identity, "costs": {str(s): c for s, c in costs.items()}})
    return costs


def _store(digest: str, entry: dict) -> None:
    """Write the entry whole or not at all (a temporary file renamed into place), readable by all."""
    tmp = None
    try:
        folder = cache_dir() / "padding"
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / f"{digest}.json")
    except (OSError, RuntimeError):
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


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
