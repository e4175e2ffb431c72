"""Cost of typed output's token mask per decode step, at several batch sizes (CPU or CUDA).

The mask is ``GrammarHead.apply_mask``: fill one bitmask row per sequence
from its matcher (xgrammar's batch filler, C++ threads) and apply it to the
batch's logits in one op. The bench drives the real head without the model:
logits are random [batch, vocab] on the device, tokens are chosen with the
head's own ``choose`` (greedy) and recorded with its ``record``, so matchers
walk through real JSON of the demo's extraction schema; each step's mask time
is measured (device synchronized). Finished sequences restart, so every step
has ``batch`` rows. With ``--engine`` it also runs the default model on the
same prompts with and without the constraint and prints output tokens/s.

    python -m bench.grammar [--device cpu|cuda] [--batch 1,64,256] [--steps 48] [--engine 0] [--model M]

The mask needs the tokenizer only: on a machine without the weights, --model
may name a folder with the model's tokenizer files and config.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from batchllm.engine.config import ModelConfig
from batchllm.engine.grammar import Constraint, GrammarCache, GrammarHead
from batchllm.engine.heads import SeqSampling, StopRule
from batchllm.engine.requests import Request
from batchllm.engine.sampling import SamplingParams
from batchllm.engine.sequence import Sequence as Seq
from batchllm.engine.tokenizer import Tokenizer
from batchllm.models import resolve_model
from batchllm.shape import FormatSpec

SCHEMA = FormatSpec(
    fields={
        "sentiment": ["positive", "negative", "mixed"],
        "mentions_acting": "bool",
        "one_word_summary": "str",
    }
)


def _fresh(i: int, max_tokens: int) -> tuple[Request, Seq]:
    params = SamplingParams(max_tokens=max_tokens)
    seq = Seq(seq_id=i, request_index=i, token_ids=[1], num_prompt_tokens=1, max_tokens=max_tokens)
    seq.params = SeqSampling(temperature=0.0, top_p=1.0, top_k=0, seed=0)  # greedy
    return Request(np.array([1]), params, [i], 0), seq


def mask_ms(cache: GrammarCache, batch: int, steps: int, device: torch.device, vocab: int) -> dict:
    """Mean/p50/p90 ms of ``apply_mask`` per step over ``steps`` steps (after 3 warm-up steps)."""
    constraint = Constraint("json_schema", SCHEMA.grammar()[1])
    stop = StopRule(cache.eos_token_ids, 1 << 20, None)
    head = GrammarHead(stop, None, cache.get(constraint), vocab, jump_forward=False)
    rows = [_fresh(i, 64) for i in range(batch)]
    next_id = batch
    gen = torch.Generator(device=device).manual_seed(0)
    times: list[float] = []
    for step in range(steps + 3):
        logits = torch.randn(batch, vocab, generator=gen, device=device)
        seqs = [s for _, s in rows]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        head.apply_mask(logits, seqs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
        tokens = head.pick(logits, seqs).tolist()
        for k, ((req, seq), token) in enumerate(zip(rows, tokens, strict=True)):
            if head.record(req, seq, token, 0.0):  # finished: a new sequence takes the row
                rows[k] = _fresh(next_id, 64)
                next_id += 1
    times.sort()
    return {
        "batch": batch,
        "mean_ms": statistics.fmean(times),
        "p50_ms": times[len(times) // 2],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "sequences": next_id,
    }


def engine_tokens_per_s(device: str, n: int, max_tokens: int) -> dict:
    """The default model on n review prompts, with and without the schema: output tokens/s of each."""
    from batchllm.engine import Engine

    engine = Engine("default", device=device)
    tok = engine.tokenizer
    system = "Answer in JSON: sentiment, mentions_acting (true/false), one_word_summary."
    reviews = ["A triumph, funny and moving.", "Tedious and badly acted.", "The cast shines.", "Too long."]
    prompts = [
        tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": f"{reviews[i % 4]} (#{i})"}]
        )
        for i in range(n)
    ]
    out = {}
    kind, source = SCHEMA.grammar()
    for name, constraint in (("free", None), ("typed", Constraint(kind, source))):
        engine.generate(prompts[:2], SamplingParams(max_tokens=4), constraint=constraint)  # warm-up, compile
        t0 = time.perf_counter()
        results = engine.generate(prompts, SamplingParams(max_tokens=max_tokens), constraint=constraint)
        wall = time.perf_counter() - t0
        tokens = sum(len(r.token_ids) for r in results)
        out[name] = {
            "wall_s": wall,
            "output_tokens": tokens,
            "tokens_per_s": tokens / wall,
            "steps": engine.stats.steps,
            "mask_s": engine.stats.grammar_mask_s,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", default="1,64,256")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--engine", type=int, default=0, help="prompts for the model run (0: skip it)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument(
        "--model", default="default", help="the model (or a folder with only its tokenizer and config.json)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    folder = resolve_model(args.model) if args.model == "default" else Path(args.model)
    vocab = ModelConfig.from_folder(folder).vocab_size
    cache = GrammarCache(folder, vocab, Tokenizer(folder).eos_token_ids)
    cache.get(Constraint("json_schema", SCHEMA.grammar()[1]))
    print(
        f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(f"schema {SCHEMA.describe()}; grammar compile {cache.compile_s * 1e3:.0f} ms (once per job)")
    print("| batch | mask ms/step (mean) | p50 | p90 |")
    print("|---|---|---|---|")
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        r = mask_ms(cache, batch, args.steps, device, vocab)
        rows.append(r)
        print(f"| {batch} | {r['mean_ms']:.3f} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} |")
    if args.engine:
        print(json.dumps(engine_tokens_per_s(args.device, args.engine, args.max_tokens), indent=1))


if __name__ == "__main__":
    main()
