"""The benchmark's FLOP, byte and floor counting on hand-checked cases, and its seeded workload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from batchllm.engine.config import ModelConfig
from bench.floor import (
    Case,
    ModelShape,
    causal_pairs,
    decode_step_counts,
    decode_step_parts,
    floor,
    forward_flops,
    make_prompts,
    measure_bandwidth,
    measure_peak,
    prefill_counts,
    shuffled_order,
    workload_flops,
)
from bench.generate import supported, table

CONFIGS = Path(__file__).resolve().parents[1] / "bench" / "configs"

# hidden 4, 1 layer, 2 heads of dim 2, 1 kv head, intermediate 8, vocab 10, bf16
TINY = ModelShape(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)
# 1 group of 2 members, prefix 2, suffix 1, 3 output tokens
SMALL = Case(prefix=2, suffix=1, decode=3, members=2, groups=1)


def test_shape_counts_by_hand() -> None:
    # q,k,v: 4 x (4 + 2 + 2) = 32; o: 4 x 4 = 16; gate, up, down: 3 x 4 x 8 = 96
    assert TINY.linear_params == 144
    assert TINY.lm_head_params == 40
    assert TINY.weight_bytes == (144 + 40) * 2
    assert TINY.kv_bytes_per_token == 2 * 1 * 1 * 2 * 2  # K and V, 1 layer, 1 kv head, dim 2, 2 bytes
    assert TINY.attn_flops_per_key == 4 * 1 * 2 * 2


def test_causal_pairs() -> None:
    assert causal_pairs(0, 3) == 1 + 2 + 3
    assert causal_pairs(2, 4) == 3 + 4
    assert causal_pairs(5, 5) == 0


def test_case_sizes() -> None:
    assert SMALL.requests == 2
    assert SMALL.logical_prompt_tokens == 6
    assert SMALL.physical_prompt_tokens == 4  # the prefix once, both suffixes
    assert SMALL.ideal_saving == pytest.approx(1 / 3)
    a = Case.parse("2000,200,100,16,100")
    assert (a.prefix, a.suffix, a.decode, a.members, a.groups) == (2000, 200, 100, 16, 100)
    assert a.ideal_saving == pytest.approx(0.8522727, abs=1e-6)  # vLLM's ideal hit rate on (a)
    assert Case.parse(a.spec) == a


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d,e", "10,10,0,2,2", "10,10,1,0,2", "0,0,1,1,1"])
def test_case_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="case"):
        Case.parse(text)


def test_prefill_and_decode_by_hand() -> None:
    tokens, sampled, pairs = prefill_counts(SMALL)
    # prefix: 1 + 2 pairs; each suffix token sees 3 keys, twice
    assert (tokens, sampled, pairs) == (4, 2, 3 + 2 * 3)
    assert forward_flops(TINY, tokens, sampled, pairs) == 2 * 144 * 4 + 2 * 40 * 2 + 16 * 9  # 1456
    # step 1: 2 tokens, each sees 4 keys; reads weights, the prefix once, 2 x (1 suffix + 1 generated)
    assert decode_step_counts(TINY, SMALL, 1) == (2 * 144 * 2 + 2 * 40 * 2 + 16 * 8, 368 + (2 + 4) * 8)
    assert decode_step_counts(TINY, SMALL, 2) == (576 + 160 + 16 * 10, 368 + (2 + 6) * 8)
    assert workload_flops(TINY, SMALL) == 1456 + 864 + 896
    # without sharing both prefixes run: 2 more tokens at the matmul cost
    assert workload_flops(TINY, SMALL, prompt_tokens_computed=6) == 3216 + 2 * 144 * 2


def test_floor_memory_and_compute_bound() -> None:
    slow = floor(TINY, SMALL, peak_flops=1000.0, bandwidth=100.0)
    assert slow.prefill_s == pytest.approx(1.456)
    assert slow.decode_s == pytest.approx(4.16 + 4.32)  # both steps read-bound
    assert (slow.decode_steps, slow.memory_bound_steps) == (2, 2)
    assert slow.decode_bytes_per_step == pytest.approx((416 + 432) / 2)
    # serial: GEMMs max(0.736 s of FLOPs, 3.68 s of weights), then attention max(FLOPs, KV bytes)
    assert slow.decode_serial_s == pytest.approx(3.68 + 0.48 + 3.68 + 0.64)
    fast = floor(TINY, SMALL, peak_flops=1000.0, bandwidth=1e12)
    assert fast.decode_s == pytest.approx(0.864 + 0.896)
    assert fast.memory_bound_steps == 0
    assert fast.decode_serial_s == pytest.approx(fast.decode_s)  # nothing read-bound: the same sum
    # GEMMs read-bound (368 weight bytes at 400/s: 0.92 s > 0.736 s of FLOPs), attention compute-bound
    # (0.128 s of FLOPs > 48 KV bytes: 0.12 s) at step 1; step 2: 0.92 + max(0.16, 0.16)
    mixed = floor(TINY, SMALL, peak_flops=1000.0, bandwidth=400.0)
    assert mixed.decode_s == pytest.approx(1.04 + 1.08)  # overlapped: max(FLOPs, bytes) of the whole step
    assert mixed.decode_serial_s == pytest.approx(0.92 + 0.128 + 0.92 + 0.16)
    assert decode_step_parts(TINY, SMALL, 1) == (736.0, 128.0, 368, 48)
    assert mixed.as_dict()["total_serial_s"] == pytest.approx(mixed.prefill_s + mixed.decode_serial_s)
    assert fast.total_s == pytest.approx(fast.prefill_s + fast.decode_s)
    one = floor(TINY, Case(2, 1, 1, 2, 1), 1000.0, 100.0)  # D=1: the prefill gives the only token
    assert (one.decode_s, one.decode_steps, one.decode_bytes_per_step) == (0.0, 0, 0.0)
    with pytest.raises(ValueError):
        floor(TINY, SMALL, 0.0, 1.0)


def test_llama_8b_matches_the_peer_constants() -> None:
    cfg = json.loads((CONFIGS / "llama31-8b" / "config.json").read_text())
    shape = ModelShape.from_config(cfg)
    # peer/results-2026-11-21/call4-kv205k.json flop_model
    assert 2 * shape.linear_params == 13_958_643_712
    assert 2 * shape.lm_head_params == 1_050_673_152
    assert shape.attn_flops_per_key == 524_288
    assert shape.kv_bytes_per_token == 128 * 1024


@pytest.mark.parametrize("name", ["llama31-8b", "qwen25-7b"])
def test_shape_agrees_with_model_config(name: str) -> None:
    cfg = json.loads((CONFIGS / name / "config.json").read_text())
    shape, mc = ModelShape.from_config(cfg), ModelConfig.from_dict(cfg)
    norms = mc.num_layers * 2 * mc.hidden_size + mc.hidden_size
    embed = mc.vocab_size * mc.hidden_size
    assert shape.linear_params + shape.lm_head_params + embed + norms == mc.num_params


def test_prompts_are_seeded_grouped_and_in_range() -> None:
    case = Case(prefix=5, suffix=3, decode=2, members=4, groups=3)
    p = make_prompts(case, vocab=100, seed=7)
    assert p.shape == (12, 8) and p.dtype == np.int64
    assert p.min() >= 10 and p.max() < 90
    groups = p.reshape(3, 4, 8)
    assert (groups[:, :, :5] == groups[:, :1, :5]).all()  # one prefix per group
    assert len({tuple(r) for r in groups[:, 0, :5]}) == 3
    assert len({tuple(r) for r in p[:, 5:]}) == 12
    assert np.array_equal(p, make_prompts(case, vocab=100, seed=7))
    assert not np.array_equal(p, make_prompts(case, vocab=100, seed=8))
    order = shuffled_order(12, 7)
    assert sorted(order.tolist()) == list(range(12))
    assert np.array_equal(order, shuffled_order(12, 7))


def test_measurements_run_on_cpu() -> None:
    assert measure_peak("cpu", n=64, dtype="float32", iters=2) > 0
    assert measure_bandwidth("cpu", nbytes=1 << 16, iters=2) > 0


def test_supported_splits_unknown_options() -> None:
    class Old:
        def __init__(self, model: str, *, device: str = "cpu") -> None: ...

    kept, ignored = supported(Old, {"device": "cuda", "load_format": "dummy"})
    assert kept == {"device": "cuda"} and ignored == ["load_format"]


def test_table_with_a_missing_peer() -> None:
    fl = floor(TINY, SMALL, 1000.0, 100.0)
    native = {"wall_s": 20.0, "req_per_s": 0.1, "mfu": 0.01, "efficiency": fl.total_s / 20.0}
    native["stats"] = {"planned_saving_ratio": 1 / 3, "saving_ratio": 1 / 3, "steps": 3}
    sorted_run = {"wall_s": 10.0, "req_per_s": 0.2, "prefix_hit_rate": 1 / 3}
    entry = {"case": SMALL.label, "requests": 2, "floor": fl.as_dict(), "native": native}
    text = table([entry | {"vllm": {"sorted": sorted_run}}])
    assert "| vLLM sorted | 10.00 | 0.20 |" in text
    assert "| vLLM shuffled | not run |" in text
    assert "0.333 / 0.333" in text and "| 0.500 |" in text  # native / vLLM sorted
