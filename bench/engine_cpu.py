"""Throughput of the native engine vs transformers ``generate`` on the default model (CPU).

256 chat prompts of varied length (replies to movie reviews from shared/data
when present: the reviews of one movie share its plot; otherwise built-in
topics), D output tokens each (EOS ignored, so
both sides generate exactly the same number of tokens). transformers runs
left-padded batches in input order, as a user would. Prints tokens/s of both
and the ratio; not a test.

``--case P,S,D,sd,G`` runs the native engine alone on bench.peers' W(P, S, D, sd,
G) workload instead (its seeded prompts in its random order, its plan, its
warm-up) and prints req/s and a digest of the generated tokens, so two
attention backends (``--attention``) can be timed against each other and
checked for the same tokens.

    python -m bench.engine_cpu [--prompts 256] [--max-tokens 32] [--hf-batch-size 32] [--threads N]
    python -m bench.engine_cpu --case 1000,100,32,16,4 [--attention torch|cpu]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from batchllm.engine import Engine, SamplingParams
from bench.plan_real import DEFAULT_DATA

DATA = DEFAULT_DATA / "llm_sql" / "movies_demo.csv"
TOPICS = ["rivers", "stars", "bread", "trains", "chess", "bees", "glaciers", "jazz", "maps", "salt"]


def chat_prompts(engine: Engine, n: int, data: Path) -> list[np.ndarray]:
    """Reply-to-a-review prompts: movie plot (shared by the reviews of a movie) + one review per row."""
    tok = engine.tokenizer
    texts: list[str] = []
    if data.is_file():
        with data.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("review_content") and row.get("movie_info"):
                    texts.append(
                        f"Movie: {row['movie_title']}\nPlot: {row['movie_info'][:400]}\n"
                        f"Review: {row['review_content']}\nWrite a one-sentence reply to this reviewer."
                    )
                if len(texts) == n:
                    break
    for i in range(len(texts), n):
        texts.append(f"Tell me something surprising about {TOPICS[i % 10]} (question {i}).")
    return [
        np.asarray(tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])), np.int64)
        for t in texts
    ]


def run_hf(model, prompts: list[np.ndarray], max_tokens: int, batch_size: int, pad: int) -> float:
    """Seconds for transformers to generate max_tokens per prompt, left-padded batches in input order."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch_size):
            batch = prompts[lo : lo + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(batch):
                ids[row, width - len(p) :] = torch.from_numpy(p)
                mask[row, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            assert out.shape[1] == width + max_tokens
    return time.perf_counter() - t0


def run_case(args: argparse.Namespace) -> None:
    """bench.peers' native run of one W case: the same prompts, order, plan and warm-up."""
    from bench.floor import Case, make_prompts, shuffled_order
    from bench.generate import warmup_case
    from bench.peers import plan_groups

    case = Case.parse(args.case)
    t = time.perf_counter()
    engine = Engine(args.model, device="cpu", max_model_len=8192, attention=args.attention)
    init = time.perf_counter() - t
    vocab = engine.config.vocab_size
    prompts = make_prompts(case, vocab, 0)
    prompts = [prompts[i] for i in shuffled_order(case.requests, 0)]
    groups = plan_groups(prompts, case.decode)
    wc = warmup_case(Case(256, 64, case.decode, 4, 2))
    engine.generate(
        list(make_prompts(wc, vocab, 10_000)), SamplingParams(max_tokens=wc.decode, ignore_eos=True)
    )
    t = time.perf_counter()
    results = engine.generate(prompts, SamplingParams(max_tokens=case.decode, ignore_eos=True), groups=groups)
    wall = time.perf_counter() - t
    assert all(r.error is None and len(r.token_ids) == case.decode for r in results)
    digest = hashlib.sha1(repr([r.token_ids for r in results]).encode()).hexdigest()[:12]
    print(
        f"W({args.case}) attention={engine.attention}: init {init:.1f} s, {wall:.2f} s, "
        f"{len(prompts) / wall:.2f} req/s, steps={engine.stats.steps}, tokens {digest}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--kv-gb", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--attention", default="auto", help="attention backend (auto: cpu on CPU)")
    ap.add_argument("--case", default=None, help="P,S,D,sd,G: the W workload of bench.peers, native only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        run_case(args)
        return

    engine = Engine(
        args.model,
        kv_cache_gb=args.kv_gb,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention=args.attention,
    )
    prompts = chat_prompts(engine, args.prompts, args.data)
    n_prompt = sum(len(p) for p in prompts)
    n_out = args.max_tokens * len(prompts)
    print(
        f"{len(prompts)} prompts, {n_prompt} prompt tokens (mean {n_prompt / len(prompts):.0f}, "
        f"max {max(len(p) for p in prompts)}), {args.max_tokens} output tokens each; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm up

    rows = []
    for sharing in (True, False):
        results = engine.generate(prompts, params, enable_sharing=sharing)
        assert all(r.error is None and len(r.token_ids) == args.max_tokens for r in results)
        s = engine.stats
        name = "batchllm (sharing)" if sharing else "batchllm (no sharing)"
        rows.append((name, s.wall_s))
        print(
            f"{name:24s} {s.wall_s:8.1f}s  {n_out / s.wall_s:8.1f} out tok/s  "
            f"{(n_prompt + n_out) / s.wall_s:8.1f} total tok/s  steps={s.steps} "
            f"mean tokens/step={s.mean_tokens_per_step:.0f} saving={s.saving_ratio:.3f}"
        )
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(engine.folder, dtype=torch.float32).eval()
        pad = engine.tokenizer.token_to_id(engine.tokenizer.eos_token or "") or 0
        run_hf(hf, prompts[:2], 2, 2, pad)  # warm up
        wall = run_hf(hf, prompts, args.max_tokens, args.hf_batch_size, pad)
        rows.append(("transformers generate", wall))
        print(
            f"{'transformers generate':24s} {wall:8.1f}s  {n_out / wall:8.1f} out tok/s  "
            f"{(n_prompt + n_out) / wall:8.1f} total tok/s  (batch {args.hf_batch_size}, left-padded)"
        )
        for name, t in rows[:-1]:
            print(f"speedup {name} vs transformers: {wall / t:.2f}x")


if __name__ == "__main__":
    main()
