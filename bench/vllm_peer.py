"""Stock vLLM on the same seeded W(P, S, D, sd, G) workloads as bench.generate: the measured peer.

bench.generate starts this as its own process after the native engine has
released the GPU, so both sides see the whole device. vLLM runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) from a folder holding only config.json,
with random weights (load_format='dummy'), the native run's dtype (--dtype), no
tokenizer, prompts as token ids, greedy with EOS ignored, and its defaults
otherwise (prefix caching on). Per case it runs

    shuffled  the requests in a random order (what a user gets by default)
    sorted    the requests grouped by prefix (the best a user can do by hand)

on the same prompts, with the prefix cache reset before each run, after one
small warm-up; with --repeat N each mode runs N times and its last run is the
result (as the native engine's: the first run at a case's shapes may pay
one-time costs on either side). Case i uses prompt seed `seed + i`, as bench.generate does.
The JSON at --out is rewritten after every run, so a crash keeps what ran.

    python -m bench.vllm_peer --model bench/configs/llama31-8b \
        --case 2000,200,100,16,100 --out /tmp/vllm.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.floor import Case, make_prompts, shuffled_order

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # the carried vLLM has no FlashInfer; greedy decoding never uses its sampler (peer/README.md)
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
BLOCK_SIZE = 16  # vLLM's default KV block size on this path
WARMUP = Case(prefix=256, suffix=32, decode=8, members=4, groups=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/configs/llama31-8b", help="folder with config.json")
    ap.add_argument("--case", action="append", type=Case.parse, default=[], help="P,S,D,sd,G (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed of the first case (case i: seed + i)")
    ap.add_argument("--modes", default="sorted,shuffled")
    ap.add_argument("--kv-tokens", type=int, default=None, help="cap the KV cache at about this many tokens")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="default: vLLM's")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16", help="the native run's dtype")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode; the last is the result")
    ap.add_argument(
        "--time-budget", type=float, default=1e9, help="skip runs that would start after this (s)"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON file")
    return ap.parse_args(argv)


def run_once(llm: Any, prompts: list[list[int]], decode: int) -> dict[str, Any]:
    """One timed LLM.generate over token-id prompts; throughput and prefix-cache hits."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=decode, ignore_eos=True, temperature=0.0, detokenize=False)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    t = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - t
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    cached = sum(o.num_cached_tokens or 0 for o in outs)
    return {
        "wall_s": wall,
        "requests": len(outs),
        "prompt_tokens": n_in,
        "output_tokens": n_out,
        "req_per_s": len(outs) / wall,
        "prompt_tok_per_s": n_in / wall,
        "output_tok_per_s": n_out / wall,
        "cached_tokens": cached,
        "prefix_hit_rate": cached / n_in if n_in else 0.0,
        "prompt_tokens_computed": n_in - cached,
        "wrong_length": sum(len(o.outputs[0].token_ids) != decode for o in outs),
    }


def engine_meta(llm: Any) -> dict[str, Any]:
    """What vLLM chose (KV blocks, batch limits, graphs), for the record; best effort."""
    try:
        vc = llm.llm_engine.vllm_config
        cc, sc = vc.cache_config, vc.scheduler_config
        return {
            "num_gpu_blocks": cc.num_gpu_blocks,
            "block_size": cc.block_size,
            "kv_cache_tokens": (cc.num_gpu_blocks or 0) * cc.block_size,
            "enable_prefix_caching": cc.enable_prefix_caching,
            "gpu_memory_utilization": cc.gpu_memory_utilization,
            "max_num_seqs": sc.max_num_seqs,
            "max_num_batched_tokens": sc.max_num_batched_tokens,
            "cudagraph_mode": str(vc.compilation_config.cudagraph_mode),
        }
    except Exception as e:  # introspection only; the runs do not depend on it
        return {"introspection_error": repr(e)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    cases = args.case or [Case.parse("2000,200,100,16,100")]
    modes = [m for m in args.modes.split(",") if m]
    t_start = time.time()
    result: dict[str, Any] = {"meta": {"cases": [c.spec for c in cases]}, "runs": [], "skipped": []}

    def dump() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))

    try:
        import vllm
        from vllm import LLM

        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        kw: dict[str, Any] = {
            "model": str(args.model),
            "load_format": "dummy",
            "dtype": args.dtype,
            "skip_tokenizer_init": True,
            "max_model_len": args.max_model_len,
            "enable_prefix_caching": True,
            "seed": args.seed,
        }
        if args.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.kv_tokens is not None:
            kw["num_gpu_blocks_override"] = math.ceil(args.kv_tokens / BLOCK_SIZE)
        t = time.perf_counter()
        llm = LLM(**kw)
        result["meta"].update(
            vllm=vllm.__version__, engine_init_s=time.perf_counter() - t, llm_kwargs=kw, **engine_meta(llm)
        )
        print("VLLM", json.dumps(result["meta"], default=str), flush=True)
        dump()
        warm = make_prompts(WARMUP, vocab, seed=10_000)
        w = run_once(llm, warm.tolist(), WARMUP.decode)
        print(f"VLLM warm-up {w['wall_s']:.2f} s", flush=True)
        for i, case in enumerate(cases):
            prompts = make_prompts(case, vocab, args.seed + i)
            orders = {
                "sorted": range(case.requests),
                "shuffled": shuffled_order(case.requests, args.seed + i),
            }
            for mode in modes:
                if time.time() - t_start > args.time_budget:
                    result["skipped"].append({"case": case.spec, "mode": mode, "why": "time budget"})
                    print(f"VLLM skip {case.label} {mode} (time budget)", flush=True)
                    continue
                walls, resets = [], []
                for _ in range(max(1, args.repeat)):
                    resets.append(llm.reset_prefix_cache())
                    r = run_once(llm, [prompts[j].tolist() for j in orders[mode]], case.decode)
                    walls.append(r["wall_s"])
                r.update(
                    index=i,
                    case=case.spec,
                    mode=mode,
                    ideal_hit_rate=case.ideal_saving,
                    cache_reset_ok=all(resets),
                    walls_s=walls,
                )
                result["runs"].append(r)
                print(
                    f"VLLM {case.label} {mode}: {r['wall_s']:.2f} s, {r['req_per_s']:.1f} req/s, "
                    f"hit {r['prefix_hit_rate']:.3f} (ideal {case.ideal_saving:.3f})",
                    flush=True,
                )
                dump()
    except Exception:
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr, flush=True)
        dump()
        return 1
    result["meta"]["total_s"] = time.time() - t_start
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
