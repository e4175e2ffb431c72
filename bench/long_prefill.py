"""The longest single prefill-only input a fixed KV memory budget scores, with and without hybrid prefill.

One engine, one KV pool of ``--kv-gb`` (dummy weights, random token ids,
two single-token labels). Without hybrid prefill the longest input is the
pool's token count (chunked prefill bounds the activations, the pool bounds
the keys and values of every layer): a prompt of exactly that length is
scored, one block longer is refused. With hybrid prefill (``engine.hybrid``)
the same pool's memory holds a sequence as long as ``HybridPrefill.capacity``
(hidden states, residual stream and one layer's KV per token), capped by
max_model_len: that prompt is scored too. Reported: both lengths, their
ratio, the time of each run and the memory each allocates beyond weights and
pool (the chunk transients).

    python -m bench.long_prefill --model bench/configs/llama31-8b --kv-gb 2 --out /tmp/long
    python -m bench.long_prefill --model tiny --device cpu --kv-gb 0.0005 --chunk 128   # CPU smoke (2 layers: no gain)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.floor import TOKEN_MARGIN
from bench.generate import git_commit, sync, write_tiny_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/configs/llama31-8b", help="folder with config.json, or 'tiny'")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--kv-gb", type=float, default=2.0, help="the KV pool: the memory budget of both runs")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (chunk size)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def _peak_reset(device: str) -> int:
    if device != "cuda":
        return 0
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_above(device: str, base: int) -> float | None:
    if device != "cuda":
        return None
    import torch

    return (torch.cuda.max_memory_allocated() - base) / (1 << 30)


def score_one(engine: Any, num_tokens: int, device: str, seed: int) -> dict[str, Any]:
    """Classify one random prompt of num_tokens; its status, time and memory beyond weights + pool."""
    from batchllm.engine.labels import LabelSet

    labels = LabelSet.from_token_ids(["yes", "no"], [[TOKEN_MARGIN], [TOKEN_MARGIN + 1]])
    rng = np.random.default_rng(seed)
    prompt = rng.integers(TOKEN_MARGIN + 2, engine.config.vocab_size, num_tokens).tolist()
    base = _peak_reset(device)
    t = time.perf_counter()
    [r] = engine.classify([prompt], labels, pack=False)
    sync(device)
    wall = time.perf_counter() - t
    return {
        "tokens": num_tokens,
        "ok": r.ok,
        "error": r.error,
        "probs": r.probs,
        "wall_s": wall,
        "tok_per_s": num_tokens / wall,
        "hybrid_units": engine.stats.hybrid_units,
        "transient_gib": _peak_above(device, base),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from batchllm.engine import Engine
    from batchllm.engine.hybrid import HybridPrefill

    folder = Path(args.model)
    if args.model == "tiny":
        folder = write_tiny_model(Path(tempfile.mkdtemp()))
    kw: dict[str, Any] = {"device": args.device, "load_format": "dummy", "kv_cache_gb": args.kv_gb}
    kw["max_num_batched_tokens"] = args.chunk
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    engine = Engine(folder, hybrid_prefill=False, **kw)
    pool_tokens = engine.num_kv_blocks * engine.block_size
    hybrid = HybridPrefill(
        engine.model,
        engine.attention,
        engine.runner.kv_cache,
        engine.block_size,
        engine.max_num_batched_tokens,
    )
    record: dict[str, Any] = {
        "commit": git_commit(),
        "model": str(args.model),
        "device": args.device,
        "dtype": str(engine.model.embed_tokens.weight.dtype),
        "kv_pool_gib": engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size() / (1 << 30),
        "pool_tokens": pool_tokens,
        "max_model_len": engine.max_model_len,
        "chunk_tokens": engine.max_num_batched_tokens,
        "hybrid_capacity": hybrid.capacity(),
    }
    if args.device == "cuda":
        import torch

        record["gpu"] = torch.cuda.get_device_name()
    paged_max = min(pool_tokens, engine.max_model_len)
    record["paged"] = score_one(engine, paged_max, args.device, 0)
    record["paged_one_block_more"] = score_one(engine, paged_max + engine.block_size, args.device, 1)
    engine.hybrid_prefill = True
    hybrid_max = min(record["hybrid_capacity"], engine.max_model_len)
    record["hybrid"] = score_one(engine, hybrid_max, args.device, 2)
    # the hybrid run must have gone through hybrid prefill (not paged, when max_model_len caps it)
    ok = record["paged"]["ok"] and record["hybrid"]["ok"] and record["hybrid"]["hybrid_units"] == 1
    record["longest_paged"] = paged_max if record["paged"]["ok"] else None
    record["longest_hybrid"] = hybrid_max if record["hybrid"]["ok"] else None
    record["ratio"] = hybrid_max / paged_max if ok else None
    record["capped_by_max_model_len"] = {
        "paged": paged_max < pool_tokens,
        "hybrid": hybrid_max < record["hybrid_capacity"],
    }
    for name in ("paged", "paged_one_block_more", "hybrid"):
        r = record[name]
        print(
            f"{name:22s} {r['tokens']:>8d} tokens  ok={r['ok']!s:5s} {r['wall_s']:7.2f} s "
            f"{r['tok_per_s']:9.0f} tok/s  transient {r['transient_gib'] or 0:.2f} GiB  {r['error'] or ''}"
        )
    print(
        f"KV pool {record['kv_pool_gib']:.2f} GiB: longest paged {record['longest_paged']}, "
        f"longest hybrid {record['longest_hybrid']} (capacity {record['hybrid_capacity']}), "
        f"ratio {record['ratio'] and round(record['ratio'], 2)}"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "long_prefill.json").write_text(json.dumps(record, indent=1, default=str))
    return 0 if ok and not record["paged_one_block_more"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
