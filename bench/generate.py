"""Generation benchmark: the native engine and stock vLLM on the same seeded workloads, in one call.

DESIGN section 7. For every case W(P, S, D, sd, G) (``--case P,S,D,sd,G``,
repeatable) the prompts are random token ids, seeded (case i: seed + i), so
both engines see identical prompts. Steps:

1. measure the matmul peak and the device copy bandwidth once (bench.floor);
2. the native engine, one instance for all cases: per case a small warm-up
   generate, then the timed one over the prompts in a random order (the engine
   plans them itself); then the engine is freed;
3. stock vLLM in a separate process (bench.vllm_peer) on the same cases,
   sorted and shuffled submission, unless ``--peer none`` or vLLM is not
   importable.

Reported per run: req/s, prompt tok/s (logical), output tok/s, saving ratio
(native: planned/achieved; vLLM: prefix hit rate), MFU (model FLOPs / time /
measured peak), the floor and efficiency = floor / measured time; for the
native engine also steps, tokens per step, prefill/decode/host time and ms per
step. A markdown table goes to stdout and ``--out``/table.md; everything to
``--out``/results.json, rewritten after each stage, with a failure of either
side recorded there instead of ending the run.

    python -m bench.generate --model bench/configs/llama31-8b \
        --case 2000,200,100,16,100 --case 4000,150,1,50,20 --out /tmp/out
    python -m bench.generate --model tiny --device cpu --case 64,16,4,4,2 --peer none   # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.compiles import compile_log
from bench.floor import (
    Case,
    ModelShape,
    floor,
    make_prompts,
    measure_bandwidth,
    measure_peak,
    shuffled_order,
    workload_flops,
)

DEFAULT_CASES = ("2000,200,100,16,100", "4000,150,1,50,20")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
VLLM_DEFAULT_UTILIZATION = 0.92
GIB = 1 << 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="bench/configs/llama31-8b", help="folder with config.json, or 'tiny' (CPU smoke)"
    )
    ap.add_argument("--case", action="append", type=Case.parse, default=[], help="P,S,D,sd,G (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed of the first case (case i: seed + i)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--attention", default=None, help="native attention backend (default: the engine's)")
    ap.add_argument("--kv-tokens", type=int, default=None, help="cap both KV pools at about this many tokens")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="native engine")
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=16384,
        help="native engine (vLLM 0.24 uses 16384 on an H200)",
    )
    ap.add_argument("--max-model-len", type=int, default=8192, help="both engines")
    ap.add_argument("--no-sharing", action="store_true", help="native engine without prefix sharing")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="native engine without CUDA graphs")
    ap.add_argument(
        "--sync-decode", action="store_true", help="native engine reads every step's tokens back at once"
    )
    ap.add_argument("--peer", default="vllm", choices=["vllm", "none"])
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=None, help="default: vLLM's")
    ap.add_argument(
        "--repeat", type=int, default=1, help="timed runs per case on each engine (the last is reported)"
    )
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds; later runs are skipped")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json, table.md, vllm.json")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat: must be at least 1, got {args.repeat}")
    return args


# ---- model folder ----------------------------------------------------------------------------


def write_tiny_model(folder: Path, **overrides: Any) -> Path:
    """config.json of a 2-layer GQA Llama (``overrides`` replace its fields): a CPU smoke run of the same
    path as the GPU one (dummy weights, no tokenizer)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": 512,
    } | overrides
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


# ---- native engine ---------------------------------------------------------------------------


def engine_kwargs(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """The Engine options this benchmark asks for (GPU-only ones only on cuda)."""
    kw: dict[str, Any] = {
        "device": args.device,
        "dtype": dtype,
        "load_format": "dummy",
        "enable_sharing": not args.no_sharing,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": min(args.max_model_len, args.model_max_len),
    }
    if args.kv_tokens is not None:
        kw["kv_cache_tokens"] = args.kv_tokens
    if args.attention is not None:
        kw["attention"] = args.attention
    if args.device == "cuda":
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
        kw["cuda_graphs"] = not args.no_cuda_graphs
    if args.sync_decode:
        kw["pipelined_decode"] = False
    return kw


def supported(cls: type, kw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split kw into what cls(...) accepts and the names it does not (recorded, never silently)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kw, []
    ignored = [k for k in kw if k not in params]
    return {k: v for k, v in kw.items() if k in params}, ignored


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(device: str, fn: Any, *a: Any, **kw: Any) -> tuple[Any, float]:
    """fn(*a, **kw) and its wall time (device synchronized on both sides)."""
    sync(device)
    t = time.perf_counter()
    out = fn(*a, **kw)
    sync(device)
    return out, time.perf_counter() - t


def timed_repeats(repeat: int, device: str, fn: Any, *a: Any, **kw: Any) -> tuple[Any, float, list[float]]:
    """The last of `repeat` timed calls, its wall time and every call's (the first run of a process pays
    one-time costs per new shape: kernel variants, GEMM heuristics, allocator growth)."""
    walls = []
    for _ in range(max(1, repeat)):
        out, wall = timed(device, fn, *a, **kw)
        walls.append(wall)
    return out, walls[-1], walls


def warmup_case(case: Case) -> Case:
    """A short case with as many sequences: the decode kernels' variants for the run's rows and groups
    are compiled, its GEMM shapes timed (engine/padding.py). Its graphs are not the timed run's: a
    graph's key holds its table width (graphs.py), so the timed run's first steps at a key run eagerly
    and its third captures (~0.1 s per key; vLLM captures its graphs at start-up)."""
    return Case(min(case.prefix, 64), min(case.suffix, 16), min(case.decode, 3), case.members, case.groups)


def warmup_cases(case: Case) -> list[Case]:
    """The warm-ups before a timed run: a few groups at the real prompt lengths (Triton compiles a
    kernel variant per tile shape, and prefill tiles follow the chunk lengths), then ``warmup_case``."""
    real = Case(case.prefix, case.suffix, min(case.decode, 2), case.members, min(case.groups, 4))
    return [real, warmup_case(case)]


def graph_info(engine: Any) -> dict[str, Any] | None:
    """The decode graphs captured (padded rows, group slots, table width), the keys whose few steps ran
    eagerly (a graph is captured at a key's third step), the sizes that run padded further because
    their GEMMs measured slower, and those measurements (engine/padding.py); None without CUDA graphs."""
    graphs = getattr(getattr(engine, "runner", None), "graphs", None)
    if graphs is None:
        return None
    padded = {s: t for s, t in (graphs.run_at or {}).items() if s != t}
    cost_us = {s: round(c * 1e6, 1) for s, c in graphs.cost.items()}
    captured = graphs.captured()
    eager = sorted(set(graphs.graphs) - set(captured))
    return {"captured": captured, "eager_only": eager, "padded": padded, "layer_gemm_us": cost_us}


ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def allocator_counts(device: str) -> dict[str, int]:
    """The CUDA caching allocator's counters that mean a wait: a retry frees cached blocks (cudaFree
    synchronizes the device) and a new device allocation may; empty on the CPU."""
    if device != "cuda":
        return {}
    import torch

    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTS}


def counts_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What the counters added between two readings."""
    return {k: after[k] - before.get(k, 0) for k in after}


def native_run(
    engine: Any, case: Case, vocab: int, seed: int, device: str, repeat: int = 1
) -> dict[str, Any]:
    """Timed generates of the case (prompts in a random order), ``repeat`` times; throughput, stats and
    the time split of the last, the wall time, Triton compiles and allocator counts of each."""
    from batchllm.engine import SamplingParams

    prompts = make_prompts(case, vocab, seed)
    shuffled = list(prompts[shuffled_order(case.requests, seed)])
    params = SamplingParams(max_tokens=case.decode, ignore_eos=True)
    for k, w in enumerate(warmup_cases(case)):
        warm = list(make_prompts(w, vocab, seed + 10_000 + k))
        engine.generate(warm, SamplingParams(max_tokens=w.decode, ignore_eos=True))
    walls, compiles, allocator = [], [], []
    for _ in range(repeat):  # later repeats: the same run on a warmer process (variance, caches)
        sync(device)
        before = allocator_counts(device)
        with compile_log() as log:
            t = time.perf_counter()
            results = engine.generate(shuffled, params)
            sync(device)
            wall = time.perf_counter() - t
        walls.append(wall)
        compiles.append(log.as_dict())
        allocator.append(counts_since(before, allocator_counts(device)))
    stats = engine.stats
    s = stats.as_dict() if hasattr(stats, "as_dict") else dict(vars(stats))
    out_tokens = sum(len(r.token_ids) for r in results)
    n = case.requests
    run = {
        "wall_s": wall,
        "requests": n,
        "req_per_s": n / wall,
        "prompt_tok_per_s": case.logical_prompt_tokens / wall,
        "output_tok_per_s": out_tokens / wall,
        "output_tokens": out_tokens,
        "errors": sum(r.error is not None for r in results),
        "wrong_length": sum(len(r.token_ids) != case.decode for r in results),
        "prompt_tokens_computed": s.get("prompt_tokens_computed"),
        "first_error": next((r.error for r in results if r.error is not None), None),
        "stats": s,
        "walls_s": walls,
        "compiles": compiles,
        "allocator": allocator,
        "graphs": graph_info(engine),
    }
    steps, decode_steps = s.get("steps"), s.get("decode_steps")
    decode_s, host_s = s.get("decode_s"), s.get("host_s")
    run["decode_ms_per_step"] = (
        1e3 * decode_s / decode_steps if decode_s is not None and decode_steps else None
    )
    run["host_ms_per_step"] = 1e3 * host_s / steps if host_s is not None and steps else None
    # steady decode steps: the host's whole time per step but the wait for the sampled ids
    steady, steady_s = s.get("steady_steps"), s.get("steady_host_s")
    run["steady_host_ms_per_step"] = 1e3 * steady_s / steady if steady and steady_s is not None else None
    return run


def run_native(
    args: argparse.Namespace, folder: Path, cases: list[Case], vocab: int, dtype: str, record: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """All cases on one native engine; returns {case index: run}; a failure is recorded, not raised."""
    runs: dict[int, dict[str, Any]] = {}
    engine = None
    try:
        from batchllm.engine import Engine

        kw, ignored = supported(Engine, engine_kwargs(args, dtype))
        record.update(engine_kwargs=kw, engine_kwargs_ignored=ignored)
        if ignored:
            print(f"WARNING: this Engine does not take {ignored}; running without them", flush=True)
        t = time.perf_counter()
        engine = Engine(folder, **kw)
        record["init_s"], record["attention"] = time.perf_counter() - t, engine.attention
        for i, case in enumerate(cases):
            if time.time() - args.t_start > args.time_budget:
                runs[i] = {"skipped": "time budget"}
                continue
            try:
                runs[i] = native_run(engine, case, vocab, args.seed + i, args.device, args.repeat)
                r = runs[i]
                fails = f", {r['wrong_length']} FAILED: {r['first_error']}" if r["wrong_length"] else ""
                walls = ", ".join(f"{w:.2f}" for w in r["walls_s"])
                comp = ", ".join(f"{c['count']} ({c['seconds']:.1f} s)" for c in r["compiles"])
                alloc = "; ".join(", ".join(f"{k[4:]} {v}" for k, v in a.items()) for a in r["allocator"])
                print(
                    f"NATIVE {case.label}: {r['wall_s']:.2f} s, {r['req_per_s']:.2f} req/s{fails}; "
                    f"walls {walls}; Triton compiles {comp}" + (f"; allocator {alloc}" if alloc else ""),
                    flush=True,
                )
            except Exception:
                runs[i] = {"error": traceback.format_exc()}
                print(runs[i]["error"], file=sys.stderr, flush=True)
    except Exception:
        record["error"] = traceback.format_exc()
        print(record["error"], file=sys.stderr, flush=True)
        for i in range(len(cases)):
            runs.setdefault(i, {"error": "the engine failed; see native_engine.error"})
    finally:
        del engine
        gc.collect()
        if args.device == "cuda":
            import torch

            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            record["gpu_free_after_gib"] = free / GIB
            record["gpu_total_gib"] = total / GIB
    return runs


# ---- vLLM peer -------------------------------------------------------------------------------


def peer_command(
    args: argparse.Namespace, folder: Path, cases: list[Case], dtype: str, budget: float, path: Path
) -> list[str]:
    """bench.vllm_peer's command line: the native run's cases, dtype, repeats and limits."""
    max_len = min(args.max_model_len, args.model_max_len)
    cmd = [sys.executable, "-m", "bench.vllm_peer", "--model", str(folder), "--seed", str(args.seed)]
    cmd += ["--max-model-len", str(max_len), "--time-budget", str(budget), "--out", str(path)]
    cmd += ["--dtype", dtype, "--repeat", str(args.repeat)]
    for case in cases:
        cmd += ["--case", case.spec]
    if args.kv_tokens is not None:
        cmd += ["--kv-tokens", str(args.kv_tokens)]
    return cmd


def run_peer(
    args: argparse.Namespace, folder: Path, cases: list[Case], dtype: str, record: dict[str, Any]
) -> dict[str, Any] | None:
    """bench.vllm_peer in its own process on the same cases; its JSON, or None if it did not run."""
    if args.peer == "none":
        record["skipped"] = "--peer none"
        return None
    if args.device != "cuda" or importlib.util.find_spec("vllm") is None:
        record["skipped"] = "vLLM is not importable here" if args.device == "cuda" else "cpu run"
        print(f"vLLM peer skipped: {record['skipped']}", flush=True)
        return None
    left = args.time_budget - (time.time() - args.t_start)
    if left <= 0:
        record["skipped"] = "time budget"
        return None
    path = (args.out or Path(tempfile.mkdtemp(prefix="bench-vllm-"))) / "vllm.json"
    path.unlink(missing_ok=True)
    cmd = peer_command(args, folder, cases, dtype, left, path)
    util = args.vllm_gpu_memory_utilization
    free = record.get("gpu_free_before_gib")
    total = record.get("gpu_total_gib")
    if util is None and free and total and free - 2.0 < VLLM_DEFAULT_UTILIZATION * total:
        util = (free - 2.0) / total  # vLLM refuses to start when less than its share is free
        record["utilization_lowered_to"] = util
        print(
            f"WARNING: {free:.1f} GiB free after the native engine; vLLM gets {util:.3f} of the GPU",
            flush=True,
        )
    if util is not None:
        cmd += ["--gpu-memory-utilization", f"{util:.4f}"]
    record["command"] = " ".join(cmd)
    proc = subprocess.Popen(cmd)
    args.children.append(proc)
    try:  # the peer's budget skips runs, but its start and a run under way may overrun it
        record["returncode"] = proc.wait(timeout=left + 300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        record["returncode"] = "killed (timeout)"
    if not path.is_file():
        record["error"] = "vllm_peer wrote no JSON"
        return None
    peer = json.loads(path.read_text())
    if peer.get("error"):
        record["error"] = peer["error"]
    return peer


# ---- figures and table -----------------------------------------------------------------------


def failed_requests(run: dict[str, Any]) -> int:
    """Requests of a run that failed or came back with the wrong length (a failed request also has the
    wrong length): a run with any is no result."""
    return max(run.get("errors", 0), run.get("wrong_length", 0))


def figures(run: dict[str, Any], shape: ModelShape, case: Case, hw: dict[str, Any], fl: Any) -> None:
    """Add MFU and efficiency (floor / measured) to a run of either engine, in place."""
    if "wall_s" not in run:
        return
    if bad := failed_requests(run):
        run["invalid"] = f"{bad} of {run['requests']} requests failed or have the wrong length"
        return
    if run.get("cache_reset_ok") is False:
        run["invalid"] = "vLLM's prefix cache was not reset before the run"
        return
    run["model_flops"] = workload_flops(shape, case, run.get("prompt_tokens_computed"))
    run["mfu"] = run["model_flops"] / run["wall_s"] / hw["peak_flops"]
    run["efficiency"] = fl.total_s / run["wall_s"]


def _f(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def table(entries: list[dict[str, Any]]) -> str:
    """Markdown: per case native, vLLM sorted, vLLM shuffled and the floor, and native / each."""
    head = (
        "| case | run | wall s | req/s | prompt tok/s | out tok/s | saving or hit | MFU | floor ÷ wall | native ÷ run |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines, detail = [head], []
    for e in entries:
        case, nat = e["case"], e["native"]
        floor_s = e["floor"]["total_s"]
        rows = [("native", nat)]
        rows += [(f"vLLM {m}", e["vllm"].get(m, {})) for m in ("sorted", "shuffled")]
        rows.append(("floor", {"wall_s": floor_s, "req_per_s": e["requests"] / floor_s, "efficiency": 1.0}))
        for name, r in rows:
            if "wall_s" not in r or "invalid" in r:
                why = (
                    r.get("invalid")
                    or r.get("skipped")
                    or ("error, see results.json" if "error" in r else "not run")
                )
                lines.append(f"| {case} | {name} | {why} | | | | | | | |\n")
                continue
            if name == "native":
                st = r["stats"]
                saving = f"{st.get('planned_saving_ratio', 0):.3f} / {st.get('saving_ratio', 0):.3f}"
            else:
                saving = _f(r.get("prefix_hit_rate"), ".3f")
            ratio = nat["req_per_s"] / r["req_per_s"] if "req_per_s" in nat and "invalid" not in nat else None
            lines.append(
                f"| {case} | {name} | {r['wall_s']:.2f} | {r['req_per_s']:.2f} | {_f(r.get('prompt_tok_per_s'), ',.0f')} "
                f"| {_f(r.get('output_tok_per_s'), ',.0f')} | {saving} | {_f(r.get('mfu'), '.1%')} "
                f"| {_f(r.get('efficiency'), '.3f')} | {_f(ratio, '.3f')} |\n"
            )
        if "stats" in nat:
            st, fl = nat["stats"], e["floor"]
            detail.append(
                f"| {case} | {st.get('steps')} | {_f(st.get('mean_tokens_per_step'), '.0f')} "
                f"| {_f(st.get('prefill_s'), '.2f')} | {_f(st.get('decode_s'), '.2f')} | {_f(st.get('host_s'), '.2f')} "
                f"| {_f(nat.get('decode_ms_per_step'), '.2f')} | {_f(nat.get('host_ms_per_step'), '.2f')} "
                f"| {st.get('steady_steps')} | {_f(nat.get('steady_host_ms_per_step'), '.3f')} "
                f"| {st.get('preemptions')} | {st.get('peak_kv_blocks')} | {fl['prefill_s']:.2f} | {fl['decode_s']:.2f} "
                f"| {_f(fl.get('decode_serial_s'), '.2f')} | {fl['decode_bytes_per_step'] / 1e9:.2f} |\n"
            )
    if detail:
        lines.append(
            "\n| case | native steps | tok/step | prefill s | decode s | host s | decode ms/step | host ms/step "
            "| steady steps | steady host ms/step "
            "| preemptions | peak KV blocks | floor prefill s | floor decode s | serial floor decode s "
            "| floor GB read/step |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        )
        lines += detail
    return "".join(lines)


def git_commit() -> str | None:
    """HEAD of the tree that runs, with '+dirty' for uncommitted changes; None without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---- main ------------------------------------------------------------------------------------


def bench_model(args: argparse.Namespace) -> tuple[Path, ModelShape, str]:
    """The model folder (a tiny config written for 'tiny'), its shape and the run's dtype; sets
    ``args.model_max_len`` and the run's clock and child processes."""
    args.t_start, args.children = time.time(), []
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.model)
    if args.model == "tiny":
        folder = write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-tiny-")))
    cfg = json.loads((folder / "config.json").read_text())
    args.model_max_len = int(cfg.get("max_position_embeddings") or args.max_model_len)
    return folder, ModelShape.from_config(cfg, DTYPE_BYTES.get(dtype, 2)), dtype


def run_meta(args: argparse.Namespace, argv: list[str] | None, dtype: str, **extra: Any) -> dict[str, Any]:
    """What a results.json says of its run: command, model, dtype, commit, Python, date."""
    return {
        "argv": sys.argv if argv is None else argv,
        "model": str(args.model),
        "dtype": dtype,
        **extra,
        "commit": os.environ.get("BENCH_COMMIT") or git_commit(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def dump(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """results.json under ``--out``, rewritten after each stage (whole or not at all: a kill mid-write
    leaves the previous stage's file)."""
    if args.out:
        part = args.out / "results.json.part"
        part.write_text(json.dumps(result, indent=1, default=str))
        os.replace(part, args.out / "results.json")


@contextlib.contextmanager
def recorded(args: argparse.Namespace, result: dict[str, Any]) -> Iterator[None]:
    """The benchmark's body: a failure is recorded in ``result`` and printed instead of ending the run
    unrecorded; a SIGTERM (a call's timeout) unwinds here too; vLLM children are killed and the results
    written whatever happens."""

    def on_term(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the first unwinds; a second must not cut the cleanup
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except BaseException as e:
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr, flush=True)
        if not isinstance(e, Exception):
            raise
    finally:
        for proc in args.children:
            if proc.poll() is None:
                proc.kill()
        result["meta"]["total_s"] = time.time() - args.t_start
        dump(args, result)
        signal.signal(signal.SIGTERM, previous)


def publish(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """The markdown table: into the results, to stdout and to ``--out``/table.md."""
    result["table"] = text
    print(text, flush=True)
    if args.out:
        (args.out / "table.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = args.case or [Case.parse(c) for c in DEFAULT_CASES]
    folder, shape, dtype = bench_model(args)
    result: dict[str, Any] = {
        "meta": run_meta(args, argv, dtype),
        "native_engine": {},
        "vllm": {},
        "cases": [],
    }
    with recorded(args, result):
        import torch

        meta = result["meta"]
        meta["torch"] = torch.__version__
        if args.device == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(0)
        big = args.device == "cuda"
        hw = {
            "peak_flops": measure_peak(args.device, 8192 if big else 512, dtype, iters=10 if big else 3),
            "bandwidth": measure_bandwidth(args.device, 1 << 31 if big else 1 << 26, iters=10 if big else 3),
        }
        result["hardware"] = hw
        print(
            f"PEAK {hw['peak_flops'] / 1e12:.4g} TFLOP/s, copy {hw['bandwidth'] / 1e12:.3g} TB/s", flush=True
        )
        floors = [floor(shape, case, hw["peak_flops"], hw["bandwidth"]) for case in cases]
        for i, (case, fl) in enumerate(zip(cases, floors, strict=True)):
            result["cases"].append(
                {"case": case.label, "spec": case.spec, "seed": args.seed + i, "requests": case.requests}
                | {"floor": fl.as_dict(), "native": {}, "vllm": {}}
            )
        dump(args, result)
        native = run_native(args, folder, cases, shape.vocab, dtype, result["native_engine"])
        for i, run in native.items():
            result["cases"][i]["native"] = run
        dump(args, result)
        ne = result["native_engine"]
        result["vllm"]["gpu_free_before_gib"] = ne.get("gpu_free_after_gib")
        result["vllm"]["gpu_total_gib"] = ne.get("gpu_total_gib")
        peer = run_peer(args, folder, cases, dtype, result["vllm"])
        if peer is not None:
            result["vllm"]["meta"] = peer.get("meta")
            result["vllm"]["skipped_runs"] = peer.get("skipped")
            for run in peer.get("runs", []):
                result["cases"][run["index"]]["vllm"][run["mode"]] = run
        for e, case, fl in zip(result["cases"], cases, floors, strict=True):
            for run in [e["native"], *e["vllm"].values()]:
                figures(run, shape, case, hw, fl)
        publish(args, result, table(result["cases"]))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
