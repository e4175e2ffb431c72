"""Shared-prefix execution gives the same tokens as plain execution (greedy, default model)."""

from __future__ import annotations

import numpy as np
import pytest

from batchllm.engine import Engine, SamplingParams

pytestmark = pytest.mark.slow  # minutes on a 2-core CPU


def shared_workload(seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Groups with prefixes of several lengths and sharing degrees 1..64, duplicates, prompts that
    are prefixes of other prompts, and mixed max_tokens."""
    rng = np.random.default_rng(seed)

    def toks(n: int) -> list[int]:
        return rng.integers(50, 49000, n).tolist()

    prompts: list[list[int]] = []
    for prefix_len, degree in [(16, 2), (37, 7), (130, 3), (48, 64), (20, 1), (300, 2)]:
        prefix = toks(prefix_len)
        prompts += [prefix + toks(int(rng.integers(1, 20))) for _ in range(degree)]
    prompts += [list(prompts[3]), list(prompts[3]), list(prompts[70])]  # exact duplicates
    prompts += [prompts[12][:40], prompts[12][:17], prompts[75][:5]]  # prefixes of other prompts
    order = rng.permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    params = [
        SamplingParams(max_tokens=int(rng.integers(1, 10)), ignore_eos=bool(i % 3))
        for i in range(len(prompts))
    ]
    return prompts, params


@pytest.fixture(scope="module")
def workload():
    return shared_workload()


@pytest.fixture(scope="module")
def runs(engine, workload):
    prompts, params = workload
    plain = engine.generate(prompts, params, enable_sharing=False)
    plain_stats = engine.stats
    shared = engine.generate(prompts, params, enable_sharing=True)
    return plain, plain_stats, shared, engine.stats


def test_tokens_identical_with_and_without_sharing(runs) -> None:
    plain, _, shared, _ = runs
    for a, b in zip(plain, shared, strict=True):
        assert a.error is None and b.error is None
        assert a.token_ids == b.token_ids, f"request {a.index}"
        assert a.finish_reason == b.finish_reason and a.text == b.text


def test_sharing_saves_prompt_compute(runs, workload) -> None:
    prompts, _ = workload
    _, plain_stats, shared, stats = runs
    logical = sum(len(p) for p in prompts)
    assert plain_stats.prompt_tokens_logical == stats.prompt_tokens_logical == logical
    assert plain_stats.prompt_tokens_computed == logical and plain_stats.saving_ratio == 0.0
    assert stats.prompt_tokens_computed < 0.6 * logical
    assert stats.saving_ratio == pytest.approx(1 - stats.prompt_tokens_computed / logical)
    assert stats.preemptions == 0
    assert stats.saving_ratio == pytest.approx(stats.planned_saving_ratio, abs=1e-9)
    assert stats.tokens_reused == logical - stats.prompt_tokens_computed
    assert stats.num_groups < plain_stats.num_groups
    assert sum(r.cached_tokens for r in shared) > 0
    assert stats.steps > 0 and stats.max_tokens_per_step <= 512 and stats.peak_kv_blocks > 0


def test_duplicates_are_computed_once(engine) -> None:
    prompt = list(range(100, 150))
    results = engine.generate([prompt, prompt, prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    assert results[0].token_ids == results[1].token_ids == results[2].token_ids
    assert engine.stats.prompt_tokens_computed == 50
    assert [r.cached_tokens for r in results][1:] == [50, 50]


def test_preemption_keeps_outputs(default_model_path, workload, runs) -> None:
    """A KV pool too small for the batch forces preemption and recompute; tokens must not change."""
    prompts, params = workload
    plain, _, _, _ = runs
    small = Engine(default_model_path, kv_cache_gb=0.03, max_num_batched_tokens=256, decode_reserve=0.1)
    pick = list(range(0, len(prompts), 2))
    out = small.generate([prompts[i] for i in pick], [params[i] for i in pick])
    assert small.stats.preemptions > 0
    assert small.stats.peak_kv_blocks <= small.num_kv_blocks
    for k, i in enumerate(pick):
        assert out[k].token_ids == plain[i].token_ids, f"request {i}"


def test_seeded_sampling_is_batch_independent(engine, workload) -> None:
    prompts, _ = workload
    params = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    batch = engine.generate(prompts[:12], params, enable_sharing=True)
    alone = [engine.generate([p], params, enable_sharing=False)[0] for p in prompts[:3]]
    for a, b in zip(alone, batch, strict=False):
        assert a.token_ids == b.token_ids
    greedy = engine.generate(prompts[:12], SamplingParams(max_tokens=6, ignore_eos=True))
    assert any(a.token_ids != b.token_ids for a, b in zip(batch, greedy, strict=True))


def test_step_time_split(runs) -> None:
    """Every step is decode-only or has prefill; runner time by kind plus host time fit in the wall time."""
    _, _, _, stats = runs
    assert stats.decode_steps > 0 and stats.decode_steps < stats.steps
    assert stats.mixed_steps <= stats.steps - stats.decode_steps
    assert stats.prefill_s > 0 and stats.decode_s > 0 and stats.host_s > 0
    assert stats.prefill_s + stats.decode_s + stats.host_s <= stats.wall_s
