"""The engine's host time per step, with the model's decode forward stubbed out (CPU).

What the Python around the model costs per step (scheduling, the step's layout, holding and
settling sampled ids, bookkeeping): on the GPU it must stay under the step's GPU time, and for
small models it sets the step rate. A one-layer, 64-wide model with dummy weights runs the
prefill steps; a decode step's forward returns zeros and its logits are a slice of them, so what a
decode step costs is the engine's own host work. Two modes, in one process:

- ``loop``: every step through the engine's loop (steady decode off);
- ``steady``: steady decode where the scheduler allows it (steady.py).

``--eos-rate r``: each decode step, a seeded random share r of the rows samples EOS (requests then
end at EOS, as real ones do). ``--padded n``: the runner takes decode steps as if CUDA graphs padded
them to multiples of n rows (``PaddedSizes``; the steps still run eagerly), so that sequences ending
inside a steady run ride on as padding, as they do on the GPU. ``--decode-reserve f``: the engine's
share of max_tokens reserved in KV at admission (below 1, more groups start and the newest are
preempted as they grow).

    python -m bench.host_step [--case 64,16,100,16,100] [--runs 4] [--modes loop,steady]
                              [--eos-rate 0.002] [--padded 64] [--kv-tokens 60000] [--decode-reserve 0.8]

Prints, per run: steps, host ms per step (decode and host time over all steps; the prefill steps'
model time excluded), steady steps and their host ms per step; then the run's schedule: decode steps
by rows (in bins of 32), the steps with prefill tokens and the decode rows they carry, prefill tokens
computed, preemptions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from batchllm.engine import Engine, SamplingParams
from batchllm.engine.attention import BatchLayout
from batchllm.engine.graphs import Key, step_key
from batchllm.engine.scheduler import Scheduler
from bench.floor import Case, make_prompts
from bench.generate import write_tiny_model

# bench.generate's tiny model with one layer, a longer context and an EOS id (rows sample it at --eos-rate)
MODEL = {
    "num_hidden_layers": 1,
    "vocab_size": 2000,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


class PaddedSizes:
    """Stands in for a GPU's CUDA graphs on the CPU: the key a decode step runs at (sizes in multiples of
    ``rows``, group slots and table width as ``DecodeGraphs.key``); ``fits`` is False, so the runner
    still runs every step eagerly."""

    def __init__(self, rows: int, block_size: int = 16) -> None:
        self.rows, self.block_size = rows, block_size

    def fits(self, layout: object) -> bool:
        return False

    def key(self, rows: int, groups: int, max_kv_len: int) -> Key:
        return step_key(-(-rows // self.rows) * self.rows, groups, max_kv_len, self.block_size, 1 << 20)


class Schedule:
    """Each step's decode rows (sequences of one query) and prefill tokens, as the runner was handed them."""

    def __init__(self) -> None:
        self.steps: list[tuple[bool, int, int]] = []  # (decode-only, decode rows, prefill tokens)

    def clear(self) -> None:
        self.steps.clear()

    def add(self, layout: BatchLayout) -> None:
        q = layout.q_lens
        self.steps.append((layout.is_decode, int((q == 1).sum()), int(q[q > 1].sum())))

    def summary(self) -> str:
        rows = Counter(r // 32 * 32 for decode, r, _ in self.steps if decode)
        mixed = [(r, p) for decode, r, p in self.steps if not decode]
        bins = ", ".join(f"{n} at {lo}-{lo + 31}" for lo, n in sorted(rows.items(), reverse=True))
        return (
            f"decode steps {rows.total()} ({bins}); steps with prefill {len(mixed)} carrying "
            f"{sum(r for r, _ in mixed)} decode rows; prefill tokens {sum(p for _, p in mixed)}"
        )


def stubbed_engine(
    folder: Path,
    schedule: Schedule,
    eos_rate: float = 0.0,
    kv_tokens: int = 1_200_000,
    decode_reserve: float = 1.0,
) -> Engine:
    """An engine whose decode forwards do no model work (prefill runs the tiny model); with eos_rate,
    each decode step's rows sample EOS at that seeded rate. ``schedule`` records every step."""
    engine = Engine(
        str(write_tiny_model(folder, **MODEL)),
        device="cpu",
        load_format="dummy",
        kv_cache_tokens=kv_tokens,
        max_num_batched_tokens=16384,
        max_model_len=4096,
        decode_reserve=decode_reserve,
    )
    run, logits = engine.runner.run, engine.model.compute_logits
    width, gen = engine.config.hidden_size, torch.Generator().manual_seed(0)

    def decode_free(layout, input_ids, rows=None):  # type: ignore[no-untyped-def]
        schedule.add(layout)
        return torch.zeros(layout.num_seqs, width) if layout.is_decode else run(layout, input_ids, rows)

    def stub_logits(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] <= 100:  # the prefill steps' few rows: the model's own logits
            return logits(hidden)
        out = hidden[:, :8].clone()
        out[torch.rand(hidden.shape[0], generator=gen) < eos_rate, MODEL["eos_token_id"]] = 1.0
        return out

    engine.runner.run = decode_free  # type: ignore[method-assign]
    engine.model.compute_logits = stub_logits  # type: ignore[method-assign]
    return engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", type=Case.parse, default=Case.parse("64,16,100,16,100"), help="P,S,D,sd,G")
    ap.add_argument("--runs", type=int, default=4, help="timed runs per mode (after one warm-up)")
    ap.add_argument("--modes", default="loop,steady")
    ap.add_argument("--eos-rate", type=float, default=0.0, help="share of rows sampling EOS per decode step")
    ap.add_argument(
        "--padded", type=int, default=0, help="decode steps padded to multiples of this (0: none)"
    )
    ap.add_argument(
        "--kv-tokens", type=int, default=1_200_000, help="KV pool (fewer: admission in waves, as at 205k)"
    )
    ap.add_argument("--decode-reserve", type=float, default=1.0, help="share of max_tokens reserved in KV")
    args = ap.parse_args(argv)
    steady = Scheduler.steady
    try:
        with tempfile.TemporaryDirectory() as tmp:
            schedule = Schedule()
            engine = stubbed_engine(Path(tmp), schedule, args.eos_rate, args.kv_tokens, args.decode_reserve)
            if args.padded:
                engine.runner.graphs = PaddedSizes(args.padded)  # type: ignore[assignment]
            prompts = list(make_prompts(args.case, MODEL["vocab_size"], 0))
            params = SamplingParams(max_tokens=args.case.decode, ignore_eos=not args.eos_rate)
            for mode in args.modes.split(","):
                Scheduler.steady = steady if mode == "steady" else (lambda self, batch, ended: False)  # type: ignore[method-assign]
                engine.generate(prompts, params)  # warm-up
                for _ in range(args.runs):
                    schedule.clear()
                    t = time.perf_counter()
                    engine.generate(prompts, params)
                    wall, s = time.perf_counter() - t, engine.stats
                    print(
                        f"{mode}: {len(prompts)} requests, {s.steps} steps, host ms/step "
                        f"{1e3 * (s.decode_s + s.host_s) / s.steps:.2f}, steady steps {s.steady_steps} "
                        f"at {1e3 * s.steady_host_s / max(1, s.steady_steps):.3f} ms, "
                        f"{s.output_tokens / len(prompts):.1f} tokens/request, wall {wall:.2f} s",
                        flush=True,
                    )
                    print(f"  {schedule.summary()}; preemptions {s.preemptions}", flush=True)
    finally:
        Scheduler.steady = steady  # type: ignore[method-assign]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
