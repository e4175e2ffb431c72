"""The floor of a shared-prefix workload: the least time the measured hardware allows.

DESIGN section 7. The workload W(P, S, D, sd, G) is G groups of sd members;
each member is the group's shared prefix of P tokens plus its own suffix of S
tokens, and generates D tokens (EOS ignored). Its floor is

    physical (deduplicated) prefill FLOPs / measured matmul peak
    + sum over the D - 1 decode steps of max(compute time, bytes that must be read
      / measured copy bandwidth)

where a decode step must read the weights once, each group's prefix KV once and
each member's own KV (suffix plus generated tokens). The first output token
comes from the prefill's last position, so D outputs take D - 1 decode steps.
efficiency = floor / measured time.

That decode term assumes the step's GEMMs (compute-bound at batch sizes in the
hundreds) overlap its attention (bandwidth-bound). On an H200 with cuBLAS they
do not (bench/RESULTS.md, 2026-12-04 (late), g1: attention on a second stream
beside the GEMMs took 1.963 ms per layer against 1.883 one after the other; a
step split in two interleaved halves 0.995x), so ``decode_serial_s`` also
counts each step as its GEMMs (max of their FLOPs and weight bytes) plus its
attention (max of its FLOPs and KV bytes): the floor an engine whose kernels
run one after the other can approach.

The counting functions are pure arithmetic (tested on CPU by
tests/test_bench_floor.py); only ``measure_peak`` and ``measure_bandwidth``
touch a device, and they import torch when called so that the vLLM peer can
import the workload helpers before vLLM sets up CUDA.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

TOKEN_MARGIN = (
    10  # token ids are drawn from [TOKEN_MARGIN, vocab - TOKEN_MARGIN): no special ids at either end
)


@dataclass(frozen=True)
class Case:
    """W(P, S, D, sd, G): G groups x sd members, shared prefix P, own suffix S, D output tokens."""

    prefix: int
    suffix: int
    decode: int
    members: int
    groups: int

    @classmethod
    def parse(cls, text: str) -> Case:
        """'P,S,D,sd,G' (the command-line form), e.g. '2000,200,100,16,100'."""
        parts = text.split(",")
        if len(parts) != 5 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"case: expected P,S,D,sd,G as five integers, got {text!r}")
        p, s, d, sd, g = (int(x) for x in parts)
        if d < 1 or sd < 1 or g < 1 or p + s < 1:
            raise ValueError(f"case: need D, sd, G >= 1 and P + S >= 1, got {text!r}")
        return cls(p, s, d, sd, g)

    @property
    def spec(self) -> str:
        return f"{self.prefix},{self.suffix},{self.decode},{self.members},{self.groups}"

    @property
    def label(self) -> str:
        return f"P={self.prefix} S={self.suffix} D={self.decode} sd={self.members} G={self.groups}"

    @property
    def requests(self) -> int:
        return self.groups * self.members

    @property
    def prompt_len(self) -> int:
        return self.prefix + self.suffix

    @property
    def logical_prompt_tokens(self) -> int:
        """Prompt tokens as submitted (every member's copy of its prefix counted)."""
        return self.requests * self.prompt_len

    @property
    def physical_prompt_tokens(self) -> int:
        """Prompt tokens when each prefix is computed once: G * P + N * S."""
        return self.groups * self.prefix + self.requests * self.suffix

    @property
    def ideal_saving(self) -> float:
        return 1.0 - self.physical_prompt_tokens / self.logical_prompt_tokens

    def as_dict(self) -> dict[str, int]:
        return {"P": self.prefix, "S": self.suffix, "D": self.decode, "sd": self.members, "G": self.groups}


def make_prompts(case: Case, vocab: int, seed: int) -> np.ndarray:
    """The case's prompts as an int64 array [N, P + S] in grouped order (group 0's members first).

    Seeded numpy, so every process that asks for (case, vocab, seed) gets the
    same token ids: the native engine and the vLLM peer run identical prompts.
    """
    if vocab <= 2 * TOKEN_MARGIN:
        raise ValueError(f"vocab: need more than {2 * TOKEN_MARGIN} token ids, got {vocab}")
    rng = np.random.default_rng(seed)
    lo, hi = TOKEN_MARGIN, vocab - TOKEN_MARGIN
    prefix = rng.integers(lo, hi, (case.groups, 1, case.prefix), dtype=np.int64)
    suffix = rng.integers(lo, hi, (case.groups, case.members, case.suffix), dtype=np.int64)
    rows = np.concatenate((np.broadcast_to(prefix, (case.groups, case.members, case.prefix)), suffix), axis=2)
    return rows.reshape(case.requests, case.prompt_len)


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """A random submission order of n requests (what a user who does not sort submits)."""
    return np.random.default_rng(seed + 1_000_003).permutation(n)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder that set its FLOPs and bytes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, cfg: dict[str, Any], dtype_bytes: int = 2) -> ModelShape:
        """From an HF config.json dict (Llama, Mistral, Qwen2/3 key names)."""
        heads = int(cfg["num_attention_heads"])
        return cls(
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            dtype_bytes=dtype_bytes,
        )

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's matmuls (q, k, v, o, gate, up, down) over all layers; biases and norms left out."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (h * (q + 2 * kv) + q * h + 3 * h * self.intermediate)

    @property
    def lm_head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def weight_bytes(self) -> int:
        """Bytes a decode step must read: every matmul weight once (embedding rows are a gather, left out)."""
        return (self.linear_params + self.lm_head_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_flops_per_key(self) -> int:
        """QK^T plus PV for one (query, key) pair over all layers and heads."""
        return 4 * self.layers * self.heads * self.head_dim


def causal_pairs(start: int, stop: int) -> int:
    """(query, key) pairs of causal attention for positions start..stop-1 over keys 0..position."""
    return (stop * (stop + 1) - start * (start + 1)) // 2


def forward_flops(shape: ModelShape, tokens: int, sampled: int, pairs: int) -> float:
    """FLOPs of forwards over `tokens` positions, the lm_head at `sampled` of them, attention over `pairs`."""
    return (
        2.0 * shape.linear_params * tokens
        + 2.0 * shape.lm_head_params * sampled
        + float(shape.attn_flops_per_key) * pairs
    )


def prefill_counts(case: Case) -> tuple[int, int, int]:
    """(tokens, sampled positions, attention pairs) of the deduplicated prefill.

    Each prefix once (causal within itself), each suffix once (the whole prefix
    plus itself, causal); the lm_head runs at every request's last position,
    which gives its first output token.
    """
    tokens = case.physical_prompt_tokens
    pairs = case.groups * causal_pairs(0, case.prefix) + case.requests * causal_pairs(
        case.prefix, case.prompt_len
    )
    return tokens, case.requests, pairs


def decode_step_parts(shape: ModelShape, case: Case, step: int) -> tuple[float, float, int, int]:
    """(matmul FLOPs, attention FLOPs, weight bytes, KV bytes) of decode step `step` in 1..D-1.

    Every member feeds its step-th output token, which sees P + S + step keys.
    Bytes: weights once, each group's prefix KV once, each member's own KV
    (suffix plus the `step` generated tokens).
    """
    n = case.requests
    attention = float(shape.attn_flops_per_key) * n * (case.prompt_len + step)
    kv_tokens = case.groups * case.prefix + n * (case.suffix + step)
    matmul = forward_flops(shape, n, n, 0)
    return matmul, attention, shape.weight_bytes, kv_tokens * shape.kv_bytes_per_token


def decode_step_counts(shape: ModelShape, case: Case, step: int) -> tuple[float, int]:
    """(FLOPs, bytes that must be read) of decode step `step` in 1..D-1 (``decode_step_parts``)."""
    matmul, attention, weights, kv = decode_step_parts(shape, case, step)
    return matmul + attention, weights + kv


def workload_flops(shape: ModelShape, case: Case, prompt_tokens_computed: int | None = None) -> float:
    """Model FLOPs of running the case: prefill plus D - 1 decode steps.

    prompt_tokens_computed (default: the physical count) is what an engine
    reports it ran; tokens beyond the physical count (no sharing, recomputed
    prefixes) are added at the per-token matmul cost, and the attention of the
    deduplicated run is kept, so the figure stays comparable across engines.
    """
    tokens, sampled, pairs = prefill_counts(case)
    if prompt_tokens_computed is not None:
        tokens = prompt_tokens_computed
    flops = forward_flops(shape, tokens, sampled, pairs)
    d, n = case.decode - 1, case.requests
    decode_pairs = n * (d * case.prompt_len + d * (d + 1) // 2)
    return flops + forward_flops(shape, n * d, n * d, decode_pairs)


@dataclass(frozen=True)
class Floor:
    """The floor of one workload on one machine, split into prefill and decode."""

    prefill_s: float
    decode_s: float
    prefill_flops: float
    decode_flops: float
    decode_bytes: float
    decode_steps: int
    memory_bound_steps: int
    decode_serial_s: float  # each step's GEMMs, then its attention (no overlap)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def decode_bytes_per_step(self) -> float:
        return self.decode_bytes / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        d["total_s"] = self.total_s
        d["total_serial_s"] = self.prefill_s + self.decode_serial_s
        d["decode_bytes_per_step"] = self.decode_bytes_per_step
        return d


def floor(shape: ModelShape, case: Case, peak_flops: float, bandwidth: float) -> Floor:
    """The floor at a measured peak (FLOP/s) and copy bandwidth (bytes/s, read + written)."""
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError(f"floor: peak and bandwidth must be > 0, got {peak_flops}, {bandwidth}")
    prefill = forward_flops(shape, *prefill_counts(case))
    decode_s = serial_s = flops_sum = bytes_sum = 0.0
    memory_bound = 0
    for step in range(1, case.decode):
        matmul, attention, weights, kv = decode_step_parts(shape, case, step)
        flops, nbytes = matmul + attention, weights + kv
        compute_s, read_s = flops / peak_flops, nbytes / bandwidth
        memory_bound += int(read_s > compute_s)
        decode_s += max(compute_s, read_s)
        serial_s += max(matmul / peak_flops, weights / bandwidth)  # the GEMMs
        serial_s += max(attention / peak_flops, kv / bandwidth)  # then attention
        flops_sum += flops
        bytes_sum += nbytes
    return Floor(
        prefill_s=prefill / peak_flops,
        decode_s=decode_s,
        prefill_flops=prefill,
        decode_flops=flops_sum,
        decode_bytes=bytes_sum,
        decode_steps=max(case.decode - 1, 0),
        memory_bound_steps=memory_bound,
        decode_serial_s=serial_s,
    )


# ---- measurement (needs torch and, for meaningful numbers, a GPU) -----------------------------


def _time_best(fn: Any, device: str, warmup: int, iters: int) -> float:
    """Best wall time of fn() in seconds: CUDA events on a GPU, perf_counter on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    cuda = str(device).startswith("cuda")
    best = float("inf")
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def _release(device: str) -> None:
    """Hand the measurement's memory back, so the engine measured next sees the whole device."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def _matmul_seconds(device: str, n: int, dtype: str, iters: int) -> float:
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    c = torch.empty(n, n, device=device, dtype=dt)
    return _time_best(lambda: torch.matmul(a, b, out=c), device, warmup=3, iters=iters)


def _copy_seconds(device: str, nbytes: int, iters: int) -> float:
    import torch

    src = torch.empty(nbytes, device=device, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return _time_best(lambda: dst.copy_(src), device, warmup=2, iters=iters)


def measure_peak(device: str = "cuda", n: int = 8192, dtype: str = "bfloat16", iters: int = 10) -> float:
    """Matmul FLOP/s of an n x n x n product, best of `iters`: the compute ceiling of the floor."""
    best = _matmul_seconds(device, n, dtype, iters)
    _release(device)
    return 2.0 * n**3 / best


def measure_bandwidth(device: str = "cuda", nbytes: int = 1 << 31, iters: int = 10) -> float:
    """Device copy bandwidth in bytes/s (bytes read plus bytes written), best of `iters`."""
    best = _copy_seconds(device, nbytes, iters)
    _release(device)
    return 2.0 * nbytes / best
