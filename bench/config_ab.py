"""Paired A/B of attention launch configurations on one engine, in one process.

Two engine runs from two processes or two device calls differ by ~15% on
their own (bench/RESULTS.md); a kernel change must beat that. This bench
builds ONE engine and runs the same workload under each configuration in
turn, round after round (A B A B ...), changing only the Triton launch
heuristics' overrides (``batchllm.kernels.paged.CONFIG_OVERRIDE``, the keys of
``BATCHLLM_ATTENTION_CONFIG``; ``{}`` = the built-in heuristics) and the engine's
own settings (SETTINGS: ``gate_up_epilogue_min_rows``, from how many rows the
gate/up GEMM writes silu(gate) * up itself; ``two_level``, 0 = every group reads
its prefix plain, over the same shared KV blocks). Each timed
run reports its wall time, throughput and Triton compiles inside the timed
region (a new configuration compiles new kernel variants: read the later
rounds).

    python -m bench.config_ab score --case 8000,150,20,40 --kv-tokens 205000 \\
        --config '{}' --config '{"block_m_pre": 64}' --rounds 2 --json /tmp/ab.json
    python -m bench.config_ab generate --case 2000,200,100,16,100 --config '{}' --config '{"num_warps": 4}'
    python -m bench.config_ab generate --case 2000,200,100,16,100 --kv-tokens 205000 \
        --config '{}' --config '{"gate_up_epilogue_min_rows": 1}'   # the epilogue at decode sizes too
    python -m bench.config_ab generate --case 2000,200,100,16,100 --kv-tokens 205000 \
        --config '{}' --config '{"two_level": 0}'   # decode ms/step, two-level against plain
    python -m bench.config_ab score --model tiny --device cpu --case 64,16,4,2 --config '{}'   # smoke

After the bench name: --config (repeatable JSON), --rounds, --json, --mode
(score: packed|members|plain); every other argument is that bench's own
(bench.score / bench.generate: --model, --case, --kv-tokens, ...).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import generate, score
from bench.compiles import compile_log

# configuration keys that set an engine setting (module, dotted attribute) instead of an attention override
SETTINGS = {
    "gate_up_epilogue_min_rows": ("batchllm.engine.model", "MLP.GEMM_EPILOGUE_MIN_ROWS"),
    "two_level": ("batchllm.engine.attention.cost", "ENABLED"),
}


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
    """(attention overrides, {(module, dotted attribute): value}) of one --config."""
    settings = {SETTINGS[k]: v for k, v in config.items() if k in SETTINGS}
    return {k: v for k, v in config.items() if k not in SETTINGS}, settings


def _owner(key: tuple[str, str]) -> tuple[Any, str]:
    """(the object that holds a setting, its attribute name)."""
    module, path = key
    *parents, attr = path.split(".")
    obj: Any = importlib.import_module(module)
    for name in parents:
        obj = getattr(obj, name)
    return obj, attr


def get_setting(key: tuple[str, str]) -> Any:
    return getattr(*_owner(key))


def set_setting(key: tuple[str, str], value: Any) -> None:
    setattr(*_owner(key), value)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench", choices=["score", "generate"])
    ap.add_argument(
        "--config", action="append", type=json.loads, default=[], help="JSON overrides (repeatable)"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mode", default="members", choices=list(score.MODES), help="score mode")
    ap.add_argument("--json", type=Path, default=None)
    ours, rest = ap.parse_known_args(argv)
    if not ours.config:
        ap.error("--config: give at least one (JSON object; '{}' = the built-in heuristics)")
    if bad := [c for c in ours.config if not isinstance(c, dict)]:
        ap.error(f"--config: JSON objects only, got {bad}")
    module = score if ours.bench == "score" else generate
    return ours, module.parse_args(rest)


def main(argv: list[str] | None = None) -> int:
    ours, args = parse(argv)
    from batchllm.engine import Engine

    module = score if ours.bench == "score" else generate
    cases = args.case or [score.parse_case("4000,150,50,20") if ours.bench == "score" else None]
    case = cases[0]
    assert case is not None, "generate: give --case"
    folder, shape, dtype = generate.bench_model(args)
    vocab = shape.vocab
    kw, _ignored = generate.supported(Engine, module.engine_kwargs(args, dtype))
    engine = Engine(folder, **kw)
    from batchllm.kernels.paged import CONFIG_OVERRIDE  # after the engine: it sets up Triton on CPU

    defaults = {key: get_setting(key) for key in SETTINGS.values()}
    runs: list[dict[str, Any]] = []
    try:
        for r in range(ours.rounds):
            for i, config in enumerate(ours.config):
                attention, settings = split_config(config)
                CONFIG_OVERRIDE.clear()
                CONFIG_OVERRIDE.update(attention)
                for key, value in {**defaults, **settings}.items():
                    set_setting(key, type(defaults[key])(value))
                if engine.runner.graphs is not None:  # captured graphs replay the configuration they were
                    engine.runner.graphs.reset()  # recorded with: this one's decode steps capture anew
                with compile_log() as log:
                    if ours.bench == "score":
                        run = score.native_run(engine, case, ours.mode, args, vocab, args.seed)
                    else:
                        run = generate.native_run(engine, case, vocab, args.seed, args.device)
                row = {
                    "round": r,
                    "config": i,
                    "override": config,
                    "wall_s": round(run["wall_s"], 3),
                    "per_s": round(run["req_per_s"], 2),
                    "errors": run["errors"],
                }
                # generate.native_run logs its timed runs' compiles itself (a nested log: not seen by ours)
                timed = [c["count"] for c in run["compiles"]] if ours.bench == "generate" else []
                row["compiles_incl_warmup"] = log.as_dict()["count"] + sum(timed)
                if ours.bench == "generate":
                    row["compiles_timed"] = timed
                    row["decode_ms_per_step"] = run["decode_ms_per_step"]
                runs.append(row)
                print(json.dumps(row), flush=True)
    finally:  # the defaults back, whatever a run raised (the bench also runs in-process)
        CONFIG_OVERRIDE.clear()
        for key, value in defaults.items():
            set_setting(key, value)
    summary = []
    for i, config in enumerate(ours.config):
        walls = [x["wall_s"] for x in runs if x["config"] == i]
        summary.append(
            {"config": i, "override": config, "walls_s": walls, "median_s": statistics.median(walls)}
        )
    base = summary[0]["median_s"]
    for s in summary:
        s["speedup_vs_first"] = round(base / s["median_s"], 3)
    result = {"bench": ours.bench, "case": case.label, "engine_kwargs": kw, "runs": runs, "summary": summary}
    print(json.dumps(summary, indent=1))
    if ours.json:
        ours.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
