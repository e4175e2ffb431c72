"""Planner scale benchmark on the synthetic templated workload (bench.workloads).

    python -m bench.plan_scale --prompts 1000000 --json
    python -m bench.plan_scale --prompts 1000000 --baseline radix --baseline-prompts 50000 --json

Prints prompts, seconds (build_plan wall time; generating the workload is not
counted), peak_rss_mb (the process's RSS high-water mark while planning, the
workload's token arrays included; the mark is reset after generating so the
generator's temporaries do not count) and saving_ratio. With ``--baseline radix`` it also times the pure-Python radix-tree
planner (tests.radix_reference) and the vectorized planner on the first
``--baseline-prompts`` prompts, checks that both find the same groups, and
extrapolates the radix time linearly to the full size (its work is linear in
the number of tokens inserted, so that is its best case; it runs with the
cyclic garbage collector paused, also its best case). It also reports the
radix tree's extra memory (RSS high-water mark above the start; a lower bound,
as heap freed by the earlier full-size run is reused first).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from typing import Any

import numpy as np

from batchllm.plan import TokenTable, build_plan
from bench.workloads import templated_prompts
from tests.radix_reference import reference_plan


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    """High-water mark of the process RSS since start or since the last _reset_peak()."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux: write 5 to clear_refs) so the planner's peak is
    measured on its own, workload in memory included, the generator's temporaries not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _head(table: TokenTable, m: int) -> TokenTable:
    return TokenTable(table.values[: table.offsets[m]], table.offsets[: m + 1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    work = templated_prompts(args.prompts, seed=args.seed, templates=args.templates)
    gen_s = time.perf_counter() - t0
    gc.collect()
    rss_before = _rss_mb()
    peak_before = _peak_rss_mb()
    reset = _reset_peak()
    t0 = time.perf_counter()
    plan = build_plan(work.table, work.max_tokens, block_size=args.block_size)
    seconds = time.perf_counter() - t0
    s = plan.stats
    out: dict[str, Any] = {
        "prompts": args.prompts,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "saving_ratio": round(s.saving_ratio, 4),
        "rss_before_plan_mb": round(rss_before, 1),
        "peak_rss_while_generating_mb": round(peak_before, 1),
        "peak_rss_is_planning_only": reset,
        "generate_seconds": round(gen_s, 3),
        "tokens": s.logical_tokens,
        "mean_prompt_tokens": round(s.logical_tokens / max(s.prompts, 1), 1),
        "physical_tokens": s.physical_tokens,
        "saving_ratio_first_level": round(s.saving_ratio_first_level or 0.0, 4),
        "groups": s.groups,
        "plain": s.plain,
        "duplicates": s.duplicates,
        "block_size": args.block_size,
        "workload": work.description,
    }
    if args.baseline == "radix":
        m = min(args.baseline_prompts, args.prompts)
        head = _head(work.table, m)
        t0 = time.perf_counter()
        small = build_plan(head, work.max_tokens[:m], block_size=args.block_size)
        vec_s = time.perf_counter() - t0
        prompts = [head.row(i) for i in range(m)]
        gc.collect()
        rss0 = _rss_mb()
        _reset_peak()
        gc.disable()  # the baseline's best case: no cyclic-GC passes over its millions of objects
        t0 = time.perf_counter()
        ref_groups, _, _ = reference_plan(prompts, args.block_size)
        radix_s = time.perf_counter() - t0
        gc.enable()
        radix_mem = _peak_rss_mb() - rss0
        got = sorted((g.prefix_len, sorted(g.members.tolist())) for g in small.iter_groups() if g.prefix_len)
        out["baseline"] = {
            "kind": "pure-Python radix tree (tests.radix_reference)",
            "prompts": m,
            "radix_seconds": round(radix_s, 3),
            "planner_seconds_same_input": round(vec_s, 3),
            "same_groups": got == sorted(ref_groups),
            "radix_extra_rss_mb": round(radix_mem, 1),
            "radix_seconds_extrapolated_to_full": round(radix_s * args.prompts / m, 1),
            "speedup_same_input": round(radix_s / max(vec_s, 1e-9), 1),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=100_000)
    p.add_argument("--templates", type=int, default=300)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", choices=["none", "radix"], default="none")
    p.add_argument("--baseline-prompts", type=int, default=50_000)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>28}: {v}")


if __name__ == "__main__":
    np.seterr(all="raise")
    main()
