"""Where the native engine's GPU time goes: torch.profiler over a W(P, S, D, sd, G) case, by kernel kind.

Two profiled generates of the same seeded prompts after a warm-up: the case
with one output token (its prefill) and the whole case; decode is their
difference. Kernels are grouped by kind (GEMM, attention, KV store, norms and
other elementwise work, copies, sampling) so a step's breakdown can be set
against its floor (bench.floor): GEMMs near the matmul peak, attention near
bandwidth, and the rest small.

Where the GPU waits: the union of the kernels' intervals (all streams) is its
busy time; the gaps between them, bucketed by length, say whether idle time is
launch overhead (many gaps of microseconds) or the host holding the GPU back
(fewer, of a millisecond or more: a sync, a slow step's host work), and the
largest are listed with their time into the run. For the gaps of a millisecond
or more it also says what the host was doing meanwhile: the engine's own steps
(schedule, layout, attention metadata, model, graph replay, head, settle,
bookkeeping; labelled for the profile only) and the torch ops and CUDA runtime
calls (a synchronize, an allocation) that overlap them, and how much of the gap
no host event covers (the engine loop's own Python).

    python -m bench.profile --case 2000,200,100,16,25 --out /tmp/prof [--warm-whole]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import inspect
import itertools
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.floor import Case, make_prompts, shuffled_order
from bench.generate import allocator_counts, counts_since, warmup_cases

KINDS = (
    ("attention", ("_attention_kernel", "_reduce_kernel", "_merge_kernel", "attn", "flash")),
    ("rope", ("rope",)),  # RoPE, with the KV store where fused (rope_store)
    ("kv_store", ("store",)),
    # gate_up: our gate/up GEMM with SiLU-and-mul in its epilogue
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "matmul", "gate_up")),
    ("sampling", ("argmax", "topk", "sort")),
    ("copy", ("memcpy", "memset", "copy")),
    ("index", ("index", "gather", "embedding")),
    ("norm_reduce", ("reduce_kernel", "norm")),
    ("cat", ("cat",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


GAP_BUCKETS_US = (10.0, 100.0, 1000.0)  # gap lengths: < 10 us, < 100 us, < 1 ms, longer


def busy_spans(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of (start, end) intervals as disjoint spans, in order."""
    spans: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if spans and s <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], e))
        else:
            spans.append((s, e))
    return spans


def idle_gaps(intervals: list[tuple[float, float]], largest: int = 10) -> dict[str, Any]:
    """Busy and idle time of the GPU from its kernels' (start, end) intervals in microseconds: the union
    of the intervals is busy, the time between its pieces idle, bucketed by gap length."""
    if not intervals:
        return {"busy_ms": 0.0, "span_ms": 0.0, "idle_ms": 0.0, "idle_by_gap_ms": {}, "largest_gaps": []}
    spans = busy_spans(intervals)
    first, end = spans[0][0], spans[-1][1]
    gaps = [(b[0] - a[1], a[1] - first) for a, b in itertools.pairwise(spans)]
    names = [f"<{b:g}us" for b in GAP_BUCKETS_US] + [f">={GAP_BUCKETS_US[-1]:g}us"]
    by_gap = dict.fromkeys(names, 0.0)
    for gap, _ in gaps:
        i = next((k for k, b in enumerate(GAP_BUCKETS_US) if gap < b), len(GAP_BUCKETS_US))
        by_gap[names[i]] += gap / 1e3
    top = sorted(gaps, reverse=True)[:largest]
    return {
        "busy_ms": sum(e - s for s, e in spans) / 1e3,
        "span_ms": (end - first) / 1e3,
        "idle_ms": sum(g for g, _ in gaps) / 1e3,
        "idle_by_gap_ms": by_gap,
        "largest_gaps": [{"gap_ms": g / 1e3, "at_ms": at / 1e3} for g, at in top],
    }


def host_in_gaps(
    intervals: list[tuple[float, float]],
    host: list[tuple[str, float, float]],
    min_gap_us: float = GAP_BUCKETS_US[-1],
    top: int = 20,
) -> dict[str, Any]:
    """What the host ran while the GPU idled: for the gaps between busy spans of at least ``min_gap_us``,
    the time each host event name (start, end in microseconds) overlaps them, summed over the gaps
    (nested events each count: a name's time is inclusive), and the gap time no host event covers."""
    spans = busy_spans(intervals)
    gaps = [(a[1], b[0]) for a, b in itertools.pairwise(spans) if b[0] - a[1] >= min_gap_us]
    starts = [s for s, _ in gaps]
    pieces: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, s, e in host:
        i = max(bisect.bisect_right(starts, s) - 1, 0)  # the last gap starting at or before s, then on
        while i < len(gaps) and gaps[i][0] < e:
            lo, hi = max(s, gaps[i][0]), min(e, gaps[i][1])
            if hi > lo:
                pieces[name].append((lo, hi))
            i += 1
    # a name nested in itself (a recursive call) counts its time once
    by_name = {n: sum(e - s for s, e in busy_spans(p)) for n, p in pieces.items()}
    covered = [piece for p in pieces.values() for piece in p]
    total = sum(e - s for s, e in gaps)
    names = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "gaps": len(gaps),
        "gap_ms": total / 1e3,
        "uncovered_ms": (total - sum(e - s for s, e in busy_spans(covered))) / 1e3,
        "by_name_ms": {n: t / 1e3 for n, t in names},
    }


def kind_walls(named: list[tuple[str, float, float]]) -> dict[str, float]:
    """Wall time per kind (ms) from (kernel name, start, end) in microseconds: the union of the kind's
    intervals. Kernels of one kind on two streams at once (decode's prefix and own attention) count
    once here, twice in a sum of durations, which then overstates the kind's share of the step."""
    by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, s, e in named:
        by_kind[kind_of(name)].append((s, e))
    walls = {k: sum(e - s for s, e in busy_spans(iv)) / 1e3 for k, iv in by_kind.items()}
    return dict(sorted(walls.items(), key=lambda kv: -kv[1]))


def kernel_table(prof: Any) -> dict[str, Any]:
    """Device time per kernel name and per kind (ms), from the profiler's events: summed durations
    (``kinds_ms``) and wall time (``kinds_wall_ms``, overlapping kernels of a kind counted once)."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    named: list[tuple[str, float, float]] = []  # kernel name, start, end (us)
    host: list[tuple[str, float, float]] = []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            host.append((ev.name, ev.time_range.start, ev.time_range.end))
            continue
        if getattr(ev, "is_user_annotation", False) or ev.name.startswith(LABEL):
            continue  # a label's range on the GPU timeline (first to last kernel): not a kernel
        per_name[ev.name][0] += ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") else 0.0
        per_name[ev.name][1] += 1
        named.append((ev.name, ev.time_range.start, ev.time_range.end))
    intervals = [(s, e) for _, s, e in named]
    kinds: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_name.items():
        kinds[kind_of(name)] += ms
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "total_ms": sum(kinds.values()),
        "kinds_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "kinds_wall_ms": kind_walls(named),
        "top": [{"name": n[:120], "ms": ms, "calls": c, "kind": kind_of(n)} for n, (ms, c) in top],
        "gpu": idle_gaps(intervals),
        "host_in_gaps": host_in_gaps(intervals, host),
    }


LABEL = "bl::"  # the profile's names for the engine's steps (record_function ranges)


def step_labels(engine: Any) -> list[tuple[str, Any, str]]:
    """The engine's per-step work: (name, owner, attribute) of each function the profile labels. A
    function imported by name is labelled in each module that calls it (steady decode builds its
    layouts and settles through its own imports, and samples through ``RowSampling.pick``)."""
    from batchllm.engine import engine as engine_module
    from batchllm.engine import runner as runner_module
    from batchllm.engine import steady as steady_module
    from batchllm.engine.graphs import DecodeGraphs
    from batchllm.engine.heads import RowSampling, TokenHead
    from batchllm.engine.scheduler import Scheduler

    return [
        ("schedule", Scheduler, "schedule"),
        ("on_step_done", Scheduler, "on_step_done"),
        ("forward", type(engine), "_forward"),
        ("layout", runner_module, "build_layout"),
        ("layout", steady_module, "build_layout"),
        ("attention_prepare", type(engine.runner.attention), "prepare"),
        ("model", type(engine.model), "forward"),
        ("graph_run", DecodeGraphs, "run"),
        ("head_launch", TokenHead, "launch"),
        ("sample", RowSampling, "pick"),
        ("hold", engine_module, "hold"),
        ("settle", engine_module, "settle"),
        ("settle", steady_module, "settle"),
        ("steady_run", steady_module.SteadyDecode, "run"),
    ]


@contextlib.contextmanager
def labelled(targets: list[tuple[str, Any, str]]) -> Iterator[None]:
    """Each target function runs inside ``record_function("bl::<name>")`` for the duration; after, each
    owner holds exactly what it held before (an inherited method is not left copied onto a subclass)."""
    saved = []
    for name, owner, attr in targets:
        own = vars(owner).get(attr)  # None: inherited, or a module attribute missing (an error below)
        fn = getattr(owner, attr)
        if not inspect.isfunction(fn) or isinstance(own, staticmethod | classmethod):
            raise TypeError(f"labelled: {owner.__name__}.{attr} is not a plain function")
        saved.append((name, owner, attr, own, fn))

    def wrap(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*a: Any, **kw: Any) -> Any:
            with record_function(LABEL + name):
                return fn(*a, **kw)

        return inner

    try:
        for name, owner, attr, _, fn in saved:
            setattr(owner, attr, wrap(name, fn))
        yield
    finally:
        for _, owner, attr, own, _ in reversed(saved):
            if own is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, own)


def profiled(engine: Any, prompts: list, decode: int) -> dict[str, Any]:
    from batchllm.engine import SamplingParams

    params = SamplingParams(max_tokens=decode, ignore_eos=True)
    torch.cuda.synchronize()
    before = allocator_counts("cuda")
    with (
        labelled(step_labels(engine)),
        profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
    ):
        t = time.perf_counter()
        engine.generate(prompts, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    allocator = counts_since(before, allocator_counts("cuda"))
    stats = engine.stats
    s = stats.as_dict() if hasattr(stats, "as_dict") else dict(vars(stats))
    return {"wall_s": wall, "stats": s, "allocator": allocator, **kernel_table(prof)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/configs/llama31-8b")
    ap.add_argument("--case", type=Case.parse, default=Case.parse("2000,200,100,16,25"))
    ap.add_argument("--kv-tokens", type=int, default=300_000)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument(
        "--warm-whole", action="store_true", help="run the whole case once unprofiled first (graphs recorded)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from batchllm.engine import Engine, SamplingParams
    from batchllm.engine.config import load_config

    folder = Path(args.model)
    vocab = load_config(folder).vocab_size
    engine = Engine(
        folder,
        device="cuda",
        dtype="bfloat16",
        load_format="dummy",
        kv_cache_tokens=args.kv_tokens,
        cuda_graphs=not args.no_cuda_graphs,
    )
    case = args.case
    for k, w in enumerate(warmup_cases(case)):  # as bench.generate's: no compiles in the profiled runs
        engine.generate(
            list(make_prompts(w, vocab, 10_000 + k)), SamplingParams(max_tokens=w.decode, ignore_eos=True)
        )
    prompts = make_prompts(case, vocab, 0)
    prompts = list(prompts[shuffled_order(case.requests, 0)])
    if args.warm_whole:  # the profiled runs are then second runs, as bench.peers times them
        engine.generate(prompts, SamplingParams(max_tokens=case.decode, ignore_eos=True))
    report = {
        "case": case.label,
        "prefill": profiled(engine, prompts, 1),
        "whole": profiled(engine, prompts, case.decode),
    }
    pre, whole = report["prefill"], report["whole"]
    kinds = set(pre["kinds_ms"]) | set(whole["kinds_ms"])
    for key in ("kinds_ms", "kinds_wall_ms"):
        report[f"decode_{key}"] = {k: whole[key].get(k, 0.0) - pre[key].get(k, 0.0) for k in kinds}
    print(f"{case.label}: prefill-only wall {pre['wall_s']:.2f} s, whole {whole['wall_s']:.2f} s")
    print(
        "| kind | prefill ms | decode ms (whole - prefill) | decode wall ms (overlaps once) |\n|---|---|---|---|"
    )
    for k in sorted(kinds, key=lambda k: -whole["kinds_ms"].get(k, 0.0)):
        print(
            f"| {k} | {pre['kinds_ms'].get(k, 0.0):.1f} | {report['decode_kinds_ms'][k]:.1f} "
            f"| {report['decode_kinds_wall_ms'][k]:.1f} |"
        )
    for phase in ("prefill", "whole"):
        gpu = report[phase]["gpu"]
        by_gap = {k: round(v, 1) for k, v in gpu["idle_by_gap_ms"].items()}
        largest = [(round(g["gap_ms"], 2), round(g["at_ms"], 1)) for g in gpu["largest_gaps"][:5]]
        print(
            f"\nGPU, {phase}: busy {gpu['busy_ms']:.1f} of {gpu['span_ms']:.1f} ms, idle "
            f"{gpu['idle_ms']:.1f} ms by gap length {by_gap}; largest gaps (ms, at ms) {largest}"
        )
        host = report[phase]["host_in_gaps"]
        names = ", ".join(f"{n} {t:.1f}" for n, t in list(host["by_name_ms"].items())[:14])
        print(
            f"host during the {host['gaps']} gaps of >= 1 ms ({host['gap_ms']:.1f} ms; "
            f"{host['uncovered_ms']:.1f} ms under no host event), ms by name (inclusive): {names}"
        )
        print(f"allocator during the run: {report[phase]['allocator']}")
        print(f"top kernels, {phase}:")
        for row in report[phase]["top"][:18]:
            print(f"  {row['ms']:9.1f} ms {row['calls']:7d}x {row['kind']:11s} {row['name']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
