"""Planner-aware sharding vs round-robin of requests over Ray engine actors (CPU, default model).

Workload W(P, S, D, sd, G) (bench.workloads): G groups of sd members share a
random P-token prefix, each member adds an S-token suffix and generates up to
D tokens (greedy). Both modes run on the same ``--workers`` engine actors
(batchllm.distributed.worker, one CPU each, model loaded once before timing):

- planned: the job's plan cut into one shard per actor by ``shard_plan``: whole
  prefix groups per actor, balanced by cost; each actor runs its shard's groups
  as given (what ``executor.kind: ray`` does).
- round-robin: request i goes to actor i mod workers, as plain data parallelism
  (Ray Data LLM) spreads rows; each actor's engine still shares the prefixes
  within its own requests (like vLLM's prefix cache), so a group split over k
  actors computes its prefix k times.

Wall time is from submitting the shards to the last result; the saving ratio is
1 - prompt tokens computed / prompt tokens, summed over the actors. Modes
alternate over ``--repeats``; the median wall is reported. Not a test.

    python -m bench.ray_sharding [--prefix 512 --suffix 32 --decode 8 --members 8 --groups 8 --workers 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from batchllm import job
from batchllm.distributed.cluster import QUIET_ENV
from batchllm.spec import JobSpec, parse_spec
from bench.workloads import shared_prefix_workload


def bench_spec(decode: int, kv_gb: float, max_batched: int, attention: str) -> JobSpec:
    """A generate job: the task, sampling and engine options the actors run with (no table is read)."""
    folder = Path(tempfile.gettempdir())
    return parse_spec(
        {
            "source": {"query": "SELECT 1 AS id"},
            "prompt": {"template": "{{ id }}"},
            "task": {"kind": "generate"},
            "sampling": {"max_tokens": decode, "temperature": 0.0},
            "engine_options": {
                "kv_cache_gb": kv_gb,
                "max_num_batched_tokens": max_batched,
                "attention": attention,
            },
            "device": "cpu",
            "output": {"table": "bench", "database": str(folder / "bench_ray_sharding.duckdb")},
        }
    )


def planned_shards(prompts: list[np.ndarray], decode: int, workers: int) -> tuple[list[Any], float]:
    """(indices, groups) per actor from the planner, and its planned saving ratio."""
    info = job.plan_prompts(prompts, decode, block_size=16, shards=workers)
    return [(info.shards[k], info.groups(k)) for k in range(len(info.shards))], float(
        info.stats["saving_ratio"]
    )


def round_robin_shards(n: int, workers: int) -> list[Any]:
    """Request i to actor i mod workers; no groups given, each actor's engine plans its own requests."""
    return [(list(range(k, n, workers)), None) for k in range(workers)]


def run_mode(ray: Any, actors: list[Any], prompts: list[np.ndarray], shards: list[Any]) -> dict[str, Any]:
    """Run one shard per actor at once; wall time, saving ratio, per-actor busy time and outputs."""
    refs = []
    t0 = time.perf_counter()
    for k, (indices, groups) in enumerate(shards):
        refs.append(actors[k].run.remote(k, [prompts[i] for i in indices], groups))
    done = ray.get(refs)
    wall = time.perf_counter() - t0
    logical = sum(int(s["prompt_tokens_logical"]) for _, s in done)
    computed = sum(int(s["prompt_tokens_computed"]) for _, s in done)
    outputs: dict[int, str | None] = {}
    for (indices, _), (outcomes, _) in zip(shards, done, strict=True):
        outputs.update({i: o.output for i, o in zip(indices, outcomes, strict=True)})
    return {
        "wall_s": wall,
        "saving_ratio": 1.0 - computed / logical if logical else 0.0,
        "prompt_tokens": logical,
        "prompt_tokens_computed": computed,
        "output_tokens": sum(int(s.get("output_tokens", 0)) for _, s in done),
        "actor_run_s": [round(float(s["run_s"]), 3) for _, s in done],
        "outputs": outputs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-gb", type=float, default=0.5)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--attention", default="auto", help="the engine's attention backend")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    from batchllm.distributed.pool import _actor_class

    w = shared_prefix_workload(args.prefix, args.suffix, args.decode, args.members, args.groups)
    prompts = [
        w.table.values[w.table.offsets[i] : w.table.offsets[i + 1]].astype(np.int64) for i in range(w.table.n)
    ]
    spec = bench_spec(args.decode, args.kv_gb, args.max_num_batched_tokens, args.attention)
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        actors = [
            _actor_class().options(num_cpus=1, max_concurrency=4).remote(spec, k) for k in range(args.workers)
        ]
        load_s = ray.get([a.load.remote() for a in actors])
        warm = [prompts[0][:32]]
        ray.get([a.run.remote(-1, warm, None) for a in actors])  # first-call costs out of the timing
        planned, planned_saving = planned_shards(prompts, args.decode, args.workers)
        modes = {"planned": planned, "round-robin": round_robin_shards(len(prompts), args.workers)}
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for name, shards in modes.items():
                runs[name].append(run_mode(ray, actors, prompts, shards))
    finally:
        ray.shutdown()

    same = sum(
        runs["planned"][0]["outputs"][i] == runs["round-robin"][0]["outputs"][i] for i in range(len(prompts))
    )
    report: dict[str, Any] = {
        "workload": w.description,
        "requests": len(prompts),
        "workers": args.workers,
        "attention": args.attention,
        "actor_load_s": [round(s, 2) for s in load_s],
        "planned_saving_ratio": planned_saving,
        "same_outputs": f"{same}/{len(prompts)}",
        "modes": {},
    }
    for name, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        report["modes"][name] = {
            "wall_s_median": statistics.median(walls),
            "wall_s": [round(x, 2) for x in walls],
            "saving_ratio": rs[0]["saving_ratio"],
            "prompt_tokens": rs[0]["prompt_tokens"],
            "prompt_tokens_computed": rs[0]["prompt_tokens_computed"],
            "output_tokens": rs[0]["output_tokens"],
            "actor_run_s": rs[-1]["actor_run_s"],
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['workload']}: {len(prompts)} requests over {args.workers} CPU actors "
        f"(model loads {report['actor_load_s']} s, not timed); planned saving {planned_saving:.1%}"
    )
    print(
        f"{'mode':<12} {'wall s (median)':>16} {'saving':>8} {'prompt tok computed':>20} {'actor run s':>16}"
    )
    for name, m in report["modes"].items():
        print(
            f"{name:<12} {m['wall_s_median']:>16.2f} {m['saving_ratio']:>8.1%} "
            f"{m['prompt_tokens_computed']:>20} {m['actor_run_s']!s:>16}"
        )
    base, ours = report["modes"]["round-robin"], report["modes"]["planned"]
    print(
        f"planned vs round-robin: {base['wall_s_median'] / ours['wall_s_median']:.2f}x faster, "
        f"{base['prompt_tokens_computed'] / max(ours['prompt_tokens_computed'], 1):.2f}x fewer prompt "
        f"tokens computed; same greedy outputs {report['same_outputs']}"
    )


if __name__ == "__main__":
    main()
