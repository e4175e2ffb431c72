"""Scoring benchmark: prefill-only classify/score on seeded W(P, S, sd, G) workloads (D = 1), in one call.

DESIGN 4.3 and section 7. Every prompt is a candidate: G queries (shared
prefix P) with sd candidates each (own suffix S), random token ids, seeded
(case i: seed + i). The native engine scores them against two labels (one
token each: the cheap path; ``--labels multi``: two 3-token labels sharing
their first token, the whole-label path) in each of ``--modes``:

    packed    the candidates of a query in sequences of up to --pack-tokens tokens (tree mask)
    members   one sequence per candidate, reading the query's shared prefix
    plain     no prefix sharing (every candidate computes its whole prompt)

A mode the attention backend cannot run (packing needs a tree mask) is
recorded as an error and the others go on. Then stock vLLM (bench.vllm_peer,
its own process, max_tokens=1: a scoring request is one prefill) on the same
prompts, unless ``--peer none`` or vLLM is not importable. Reported per run:
items/s, prompt tok/s (logical), steps, tokens per step, saving ratio, peak KV
blocks, packs, MFU and native / vLLM. A markdown table goes to stdout and
``--out``/table.md, everything to ``--out``/results.json.

    python -m bench.score --model bench/configs/llama31-8b --case 4000,150,50,20 --out /tmp/score
    python -m bench.score --model tiny --device cpu --case 64,16,4,2 --peer none     # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.floor import (
    TOKEN_MARGIN,
    Case,
    make_prompts,
    measure_peak,
    shuffled_order,
    workload_flops,
)
from bench.generate import (
    bench_model,
    dump,
    publish,
    recorded,
    run_meta,
    run_peer,
    supported,
    timed_repeats,
)

MODES = ("packed", "members", "plain")


def parse_case(text: str) -> Case:
    """'P,S,sd,G' (D = 1), or the 5-field form of bench.generate with D = 1."""
    parts = text.split(",")
    if len(parts) == 4:
        p, s, sd, g = parts
        text = f"{p},{s},1,{sd},{g}"
    case = Case.parse(text)
    if case.decode != 1:
        raise ValueError(f"case: scoring has D = 1, got {text!r}")
    return case


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/configs/llama31-8b", help="folder with config.json, or 'tiny'")
    ap.add_argument("--case", action="append", type=parse_case, default=[], help="P,S,sd,G (repeatable)")
    ap.add_argument("--modes", default="packed,members", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--labels", default="single", choices=["single", "multi"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--attention", default=None, help="native attention backend (default: the engine's)")
    ap.add_argument("--kv-tokens", type=int, default=None, help="cap both KV pools at about this many tokens")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--pack-tokens", type=int, default=2048, help="candidate tokens per pack")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed runs per case and mode on each engine (the last is reported)",
    )
    ap.add_argument("--peer", default="vllm", choices=["vllm", "none"])
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds; later runs are skipped")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json, table.md, vllm.json")
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in args.modes if m not in MODES]:
        ap.error(f"--modes: unknown {bad}")
    if args.repeat < 1:
        ap.error(f"--repeat: must be at least 1, got {args.repeat}")
    return args


def label_set(kind: str) -> Any:
    """Token-id labels (dummy weights have no tokenizer): two single tokens, or two 3-token labels
    sharing their first token (the whole-label path: 2 extra positions per candidate)."""
    from batchllm.engine.labels import LabelSet

    a, b, c = TOKEN_MARGIN, TOKEN_MARGIN + 1, TOKEN_MARGIN + 2
    if kind == "single":
        return LabelSet.from_token_ids(["yes", "no"], [[a], [b]])
    return LabelSet.from_token_ids(["very yes", "very no"], [[a, c, a], [a, c, b]])


def engine_kwargs(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "device": args.device,
        "dtype": dtype,
        "load_format": "dummy",
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": min(args.max_model_len, args.model_max_len),
    }
    if args.kv_tokens is not None:
        kw["kv_cache_tokens"] = args.kv_tokens
    if args.attention is not None:
        kw["attention"] = args.attention
    if args.device == "cuda":
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kw


def native_run(engine: Any, case: Case, mode: str, args: argparse.Namespace, vocab: int, seed: int) -> dict:
    """One timed classify of the case's candidates in a random order; throughput and engine stats."""
    labels = label_set(args.labels)
    options = {"pack": mode == "packed", "pack_tokens": args.pack_tokens, "enable_sharing": mode != "plain"}
    prompts = make_prompts(case, vocab, seed)
    shuffled = list(prompts[shuffled_order(case.requests, seed)])
    w = Case(min(case.prefix, 256), min(case.suffix, 64), 1, min(case.members, 4), 2)
    engine.classify(list(make_prompts(w, vocab, seed + 10_000)), labels, **options)  # warm-up
    results, wall, walls = timed_repeats(
        args.repeat, args.device, engine.classify, shuffled, labels, **options
    )
    s = engine.stats.as_dict()
    return {
        "wall_s": wall,
        "walls_s": walls,
        "requests": case.requests,
        "req_per_s": case.requests / wall,
        "prompt_tok_per_s": case.logical_prompt_tokens / wall,
        "errors": sum(not r.ok for r in results),
        "first_error": next((r.error for r in results if not r.ok), None),
        "prompt_tokens_computed": s["prompt_tokens_computed"],
        "stats": s,
    }


def run_native(
    args: argparse.Namespace, folder: Path, cases: list[Case], vocab: int, dtype: str, record: dict
) -> dict:
    """{(case index, mode): run} on one engine; failures are recorded, not raised."""
    runs: dict[tuple[int, str], dict[str, Any]] = {}
    engine = None
    try:
        from batchllm.engine import Engine

        kw, ignored = supported(Engine, engine_kwargs(args, dtype))
        record.update(engine_kwargs=kw, engine_kwargs_ignored=ignored)
        t = time.perf_counter()
        engine = Engine(folder, **kw)
        record["init_s"], record["attention"] = time.perf_counter() - t, engine.attention
        for i, case in enumerate(cases):
            for mode in args.modes:
                if time.time() - args.t_start > args.time_budget:
                    runs[i, mode] = {"skipped": "time budget"}
                    continue
                try:
                    r = runs[i, mode] = native_run(engine, case, mode, args, vocab, args.seed + i)
                    print(
                        f"NATIVE {mode} {case.label}: {r['wall_s']:.2f} s, {r['req_per_s']:.1f} items/s",
                        flush=True,
                    )
                except Exception:
                    runs[i, mode] = {"error": traceback.format_exc()}
                    print(runs[i, mode]["error"], file=sys.stderr, flush=True)
    except Exception:
        record["error"] = traceback.format_exc()
        print(record["error"], file=sys.stderr, flush=True)
    finally:
        del engine
        gc.collect()
        if args.device == "cuda":
            import torch

            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            record["gpu_free_after_gib"], record["gpu_total_gib"] = free / (1 << 30), total / (1 << 30)
    return runs


def _f(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def table(entries: list[dict[str, Any]]) -> str:
    """Markdown: per case each native mode and vLLM, with native / vLLM shuffled."""
    lines = [
        "| case | run | wall s | items/s | prompt tok/s | steps | tok/step | saving | packs | peak KV | MFU | ÷ vLLM shuffled |\n",
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    ]
    for e in entries:
        peer = e["vllm"].get("shuffled", {})
        rows = [(f"native {m}", r) for m, r in e["native"].items()]
        rows += [(f"vLLM {m}", e["vllm"].get(m, {})) for m in ("sorted", "shuffled")]
        for name, r in rows:
            if "wall_s" not in r or r.get("errors"):
                last = r["error"].strip().splitlines()[-1] if "error" in r else "not run"
                why = r.get("first_error") or r.get("skipped") or last
                lines.append(f"| {e['case']} | {name} | {str(why)[:60]} | | | | | | | | | |\n")
                continue
            st = r.get("stats", {})
            saving = st.get("saving_ratio", r.get("prefix_hit_rate"))
            ratio = r["req_per_s"] / peer["req_per_s"] if "req_per_s" in peer else None
            lines.append(
                f"| {e['case']} | {name} | {r['wall_s']:.2f} | {r['req_per_s']:.1f} | {_f(r.get('prompt_tok_per_s'), ',.0f')} "
                f"| {_f(st.get('steps'), 'd')} | {_f(st.get('mean_tokens_per_step'), '.0f')} | {_f(saving, '.3f')} "
                f"| {_f(st.get('packs'), 'd')} | {_f(st.get('peak_kv_blocks'), 'd')} | {_f(r.get('mfu'), '.1%')} "
                f"| {_f(ratio, '.2f')} |\n"
            )
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = args.case or [parse_case("4000,150,50,20")]
    folder, shape, dtype = bench_model(args)
    result: dict[str, Any] = {
        "meta": run_meta(args, argv, dtype, labels=args.labels),
        "native_engine": {},
        "vllm": {},
        "cases": [
            {"case": c.label, "spec": c.spec, "seed": args.seed + i, "native": {}, "vllm": {}}
            for i, c in enumerate(cases)
        ],
    }
    with recorded(args, result):
        big = args.device == "cuda"
        peak = measure_peak(args.device, 8192 if big else 512, dtype, iters=10 if big else 3)
        result["hardware"] = {"peak_flops": peak}
        native = run_native(args, folder, cases, shape.vocab, dtype, result["native_engine"])
        for (i, mode), run in native.items():
            result["cases"][i]["native"][mode] = run
        dump(args, result)
        ne = result["native_engine"]
        result["vllm"]["gpu_free_before_gib"] = ne.get("gpu_free_after_gib")
        result["vllm"]["gpu_total_gib"] = ne.get("gpu_total_gib")
        peer = run_peer(args, folder, cases, dtype, result["vllm"])
        for run in (peer or {}).get("runs", []):
            result["cases"][run["index"]]["vllm"][run["mode"]] = run
        for e, case in zip(result["cases"], cases, strict=True):
            for run in [*e["native"].values(), *e["vllm"].values()]:
                if "wall_s" in run and not run.get("errors"):
                    run["mfu"] = (
                        workload_flops(shape, case, run.get("prompt_tokens_computed")) / run["wall_s"] / peak
                    )
        publish(args, result, table(result["cases"]))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
