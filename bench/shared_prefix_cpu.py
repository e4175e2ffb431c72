"""Shared-prefix workload W(P, S, D, sd, G) on the default model (CPU): sharing vs none vs transformers.

G groups x sd members; each group shares a random P-token prefix, each member
adds a distinct S-token suffix and generates D tokens (EOS ignored). Runs, in
one process: the engine with prefix sharing (plan + two-level attention), the
engine without sharing, and transformers ``generate`` (batches of
--hf-batch-size prompts of equal length, so no padding). Prints wall time,
tokens/s, saving ratios and the speedups; not a test. The defaults are the
W(1000, 100, 32, 16, 8) of the issue; --quick runs W(256, 32, 16, 8, 4).

    python -m bench.shared_prefix_cpu [--prefix 1000 --suffix 100 --decode 32 --members 16 --groups 8]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from batchllm.engine import Engine, SamplingParams
from bench.engine_cpu import run_hf
from bench.workloads import shared_prefix_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", type=int, default=1000)
    ap.add_argument("--suffix", type=int, default=100)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="W(256, 32, 16, 8, 4)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--kv-gb", type=float, default=4.0)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--skip", default="", help="comma list of runs to skip: plain,hf")
    args = ap.parse_args()
    if args.quick:
        args.prefix, args.suffix, args.decode, args.members, args.groups = 256, 32, 16, 8, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))

    w = shared_prefix_workload(args.prefix, args.suffix, args.decode, args.members, args.groups)
    prompts = [
        w.table.values[w.table.offsets[i] : w.table.offsets[i + 1]].astype(np.int64) for i in range(w.table.n)
    ]
    n_prompt, n_out = sum(len(p) for p in prompts), args.decode * len(prompts)
    print(
        f"{w.description}: {len(prompts)} requests, {n_prompt} prompt tokens, {n_out} output tokens; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    engine = Engine(args.model, kv_cache_gb=args.kv_gb, max_num_batched_tokens=args.max_num_batched_tokens)
    params = SamplingParams(max_tokens=args.decode, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm up

    walls: dict[str, float] = {}
    outputs = {}
    for name, sharing in (("sharing", True), ("plain", False)):
        if name in skip:
            continue
        results = engine.generate(prompts, params, enable_sharing=sharing)
        assert all(r.error is None and len(r.token_ids) == args.decode for r in results)
        outputs[name] = [r.token_ids for r in results]
        s = engine.stats
        walls[name] = s.wall_s
        print(
            f"batchllm {name:8s} {s.wall_s:8.1f}s  {n_out / s.wall_s:7.1f} out tok/s  "
            f"{(n_prompt + n_out) / s.wall_s:8.1f} total tok/s | steps={s.steps} "
            f"tokens/step mean={s.mean_tokens_per_step:.0f} max={s.max_tokens_per_step} "
            f"prefill computed={s.prompt_tokens_computed}/{s.prompt_tokens_logical} "
            f"saving achieved={s.saving_ratio:.3f} planned={s.planned_saving_ratio:.3f} "
            f"peak KV blocks={s.peak_kv_blocks}/{s.num_kv_blocks} preemptions={s.preemptions}"
        )
    if len(outputs) == 2:
        same = sum(a == b for a, b in zip(outputs["sharing"], outputs["plain"], strict=True))
        print(f"identical outputs sharing vs plain: {same}/{len(prompts)}")
    if "hf" not in skip:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(engine.folder, dtype=torch.float32).eval()
        run_hf(hf, prompts[:1], 2, 1, pad=0)  # warm up
        walls["transformers"] = run_hf(hf, prompts, args.decode, args.hf_batch_size, pad=0)
        t = walls["transformers"]
        print(
            f"transformers     {t:8.1f}s  {n_out / t:7.1f} out tok/s  {(n_prompt + n_out) / t:8.1f} total tok/s "
            f"| batch {args.hf_batch_size}"
        )
    if "sharing" in walls:
        for other in ("plain", "transformers"):
            if other in walls:
                print(f"speedup sharing vs {other}: {walls[other] / walls['sharing']:.2f}x")
    if "plain" in walls and "transformers" in walls:
        print(f"speedup plain vs transformers: {walls['transformers'] / walls['plain']:.2f}x")


if __name__ == "__main__":
    main()
