"""The engine on CUDA against itself on CPU and against transformers, on a random-weight Llama.

GPU machines have no model hub and no shipped weights, so this builds a small
Llama-architecture folder with random weights (transformers' own init, fixed
seed) and a word-level tokenizer, then runs a shared-prefix workload (G groups
x sd members, greedy, EOS ignored):

- CUDA float32, sharing on and off, each attention backend, must give the CPU
  float32 tokens;
- CUDA bfloat16 (sharing on/off, CUDA graphs on/off) is reported as token
  agreement with CPU float32 and its first divergences (bf16 rounding depends
  on the batch shape, so small differences are expected, not asserted), and,
  for the sharing run, as teacher-forced agreement: every position of the CPU
  float32 continuation is fed as a prompt (prompt + reference[:k], one greedy
  token each: the planner shares them as prefixes) and the bf16 engine's next
  token is compared with reference[k]. Position-wise agreement counts every
  token after a first divergence as lost; teacher forcing counts each step's
  own choice once, which is what a bf16 kernel changes;
- transformers greedy `generate` on CUDA float32 vs the engine, first 4 prompts.

    python -m bench.gpu_check [--groups 4 --members 8 --prefix 64 --decode 16]
    python -m bench.gpu_check --model FOLDER   # a model with real weights (chat prompts of real text)

Random weights give near-flat logits, so bf16 rounding flips greedy choices
within a few tokens for the torch reference as much as for our kernels; bf16
agreement is meaningful only with ``--model`` (real weights, peaked logits).

Prints one JSON object; exits non-zero when a float32 check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def build_model(folder: Path, vocab: int = 512, **overrides: Any) -> None:
    """A 4-layer GQA Llama with random weights and a tokenizer of `vocab` word tokens (``overrides``:
    LlamaConfig fields to change)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = dict(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.25,  # wide enough that greedy tokens vary (0.02 collapses to one token)
    )
    config = LlamaConfig(**(fields | overrides))
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2", "bos_token": "w1"}))


def workload(groups: int, members: int, prefix: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(groups):
        shared = rng.integers(3, vocab, prefix).tolist()
        for _ in range(members):
            prompts.append(shared + rng.integers(3, vocab, int(rng.integers(4, 24))).tolist())
    order = rng.permutation(len(prompts))
    return [prompts[i] for i in order]


TOPICS = (
    "a lighthouse keeper who finds a message in a bottle",
    "how bread rises and why salt matters",
    "the history of the printing press in Europe",
    "a robot learning to paint sunsets",
    "why the sky is blue, for a ten-year-old",
    "the trade routes of the Silk Road",
    "a chess game between two old friends",
    "how vaccines train the immune system",
)


def text_workload(folder: Path, groups: int, members: int, seed: int = 0) -> list[list[int]]:
    """Chat prompts of real text: per group one long shared instruction, per member its own question."""
    from batchllm.engine.tokenizer import Tokenizer

    tok = Tokenizer(folder)
    rng = np.random.default_rng(seed)
    prompts = []
    for g in range(groups):
        system = (
            f"You are a careful writer. Style guide number {g}: write plainly, prefer short sentences, "
            "explain every technical word, never use lists, and end with a one-line summary. "
            + " ".join(f"Rule {k}: keep paragraph {k} under {40 + 7 * k} words." for k in range(12))
        )
        for _ in range(members):
            topic = TOPICS[int(rng.integers(len(TOPICS)))]
            ask = f"Write about {topic}. Mention the number {int(rng.integers(1000))}."
            text = tok.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": ask}],
                add_generation_prompt=True,
            )
            prompts.append(tok.encode(text))
    order = rng.permutation(len(prompts))
    return [prompts[i] for i in order]


CHECK_KV_TOKENS = 1 << 16


def run(
    folder: Path, prompts: list[list[int]], decode: int, **kwargs: object
) -> tuple[list[list[int]], float]:
    from batchllm.engine import Engine, SamplingParams

    # a pool this check fills, not 90% of the GPU: engines of earlier checks may not be freed yet
    engine = Engine(folder, kv_cache_tokens=CHECK_KV_TOKENS, **kwargs)
    params = SamplingParams(max_tokens=decode, ignore_eos=True)
    engine.generate(prompts[:2], params)  # warm-up
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = engine.generate(prompts, params)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    del engine
    gc.collect()
    return [list(r.token_ids) for r in out], secs


def teacher_forced(
    folder: Path, prompts: list[list[int]], reference: list[list[int]], **kwargs: object
) -> tuple[float, list[tuple[int, int]]]:
    """Share of positions k where the engine's greedy token after prompt + reference[:k] is reference[k],
    and (request, position) of the first misses."""
    from batchllm.engine import Engine, SamplingParams

    engine = Engine(folder, kv_cache_tokens=CHECK_KV_TOKENS, **kwargs)
    forced = [(i, k) for i, ref in enumerate(reference) for k in range(len(ref))]
    inputs = [prompts[i] + reference[i][:k] for i, k in forced]
    out = engine.generate(inputs, SamplingParams(max_tokens=1, ignore_eos=True))
    misses = [(i, k) for (i, k), r in zip(forced, out, strict=True) if list(r.token_ids) != [reference[i][k]]]
    del engine
    gc.collect()
    return 1 - len(misses) / max(len(forced), 1), misses[:8]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, list[tuple[int, int]]]:
    """Share of equal tokens position by position, and (request, position) of the first divergences."""
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    total = sum(len(r) for r in a)
    firsts = [
        (i, next(k for k, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y))
        for i, (ra, rb) in enumerate(zip(a, b, strict=True))
        if ra != rb
    ]
    return same / max(total, 1), firsts[:8]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--attention", default="torch,triton", help="backends to check, comma-separated")
    ap.add_argument("--model", type=Path, default=None, help="a model folder with real weights")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "CUDA is not available"}))
        return 2
    if args.model is not None:
        folder = args.model
        prompts = text_workload(folder, args.groups, args.members)
    else:
        folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        build_model(folder)
        prompts = workload(args.groups, args.members, args.prefix, 512)
    n = len(prompts)
    cpu, cpu_s = run(folder, prompts, args.decode, device="cpu")
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": str(args.model or "random-weight check model"),
        "requests": n,
        "prompt_tokens": sum(len(p) for p in prompts),
    }
    seconds = report["seconds"] = {"cpu_f32_sharing": cpu_s}
    ok = True
    f32_on: list[list[int]] = []
    bf16: dict[str, list[list[int]]] = {}  # backend -> bf16 tokens (sharing, graphs)
    for backend in args.attention.split(","):
        checks = {}
        for dtype in ("float32", "bfloat16"):
            for sharing in (True, False):
                for graphs in (True, False) if dtype == "bfloat16" else (True,):
                    name = f"{dtype}_{'sharing' if sharing else 'plain'}{'' if graphs else '_eager'}"
                    tokens, secs = run(
                        folder,
                        prompts,
                        args.decode,
                        device="cuda",
                        dtype=dtype,
                        enable_sharing=sharing,
                        attention=backend,
                        cuda_graphs=graphs,
                    )
                    seconds[f"{backend}_{name}"] = secs
                    share, firsts = agreement(tokens, cpu)
                    checks[name] = {
                        "identical_to_cpu_f32": sum(a == b for a, b in zip(tokens, cpu, strict=True))
                    }
                    checks[name]["token_agreement"] = round(share, 4)
                    checks[name]["first_divergences"] = firsts
                    if name == "bfloat16_sharing":
                        bf16[backend] = tokens
                        forced, misses = teacher_forced(
                            folder, prompts, cpu, device="cuda", dtype=dtype, attention=backend
                        )
                        checks[name]["teacher_forced_agreement"] = round(forced, 4)
                        checks[name]["teacher_forced_first_misses"] = misses
                    if dtype == "float32":
                        ok = ok and checks[name]["identical_to_cpu_f32"] == n
                        if sharing and backend == "torch":
                            f32_on = tokens
        report[backend] = checks

    if len(bf16) > 1:
        # random weights give near-flat logits, so bf16 rounding flips greedy choices against float32
        # early; the same dtype on two backends isolates the kernels' own differences
        (a, ta), (b, tb) = list(bf16.items())[:2]
        share, firsts = agreement(tb, ta)
        report[f"bfloat16_{b}_vs_{a}"] = {"token_agreement": round(share, 4), "first_divergences": firsts}

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    hf_tokens = []
    for prompt in prompts[:4]:
        ids = torch.tensor([prompt], device="cuda")
        out = hf.generate(ids, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False)
        hf_tokens.append(out[0, len(prompt) :].tolist())
    same_hf = sum(x == y for x, y in zip(hf_tokens, (f32_on or cpu)[:4], strict=True))
    report["hf_cuda_f32_vs_engine_identical"] = f"{same_hf}/4"
    print(json.dumps(report, indent=1))
    return 0 if ok and same_hf == 4 else 1


if __name__ == "__main__":
    sys.exit(main())
