"""KV exhaustion with wrong estimates: a pool far too small for the batch (two requests at full
length), almost nothing reserved for decode (``decode_reserve`` 0.02: the scheduler's estimate is
wrong by 50x), long outputs.

The engine must preempt (recompute), never deadlock (a watchdog bounds each call), never drop a
request, and give exactly the tokens of a roomy run (greedy). A request that can never fit the
pool is an error for that request alone, not a hang.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from batchllm.engine import Engine, SamplingParams

pytestmark = pytest.mark.slow

BLOCK = 16
MAX_TOKENS = 24


def _watchdog(call: Callable[[], Any], seconds: float = 300) -> Any:
    """Run ``call`` in a daemon thread; a deadlocked engine fails the test instead of hanging it."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no progress after {seconds}s: deadlock"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _prompts() -> list[list[int]]:
    """3 groups x 4 members: a 48-token shared prefix, 8 distinct tokens each, plus 2 loners."""
    prompts = []
    for g in range(3):
        prefix = [1000 + 37 * g + k for k in range(48)]
        prompts += [prefix + [5000 + 100 * g + 10 * m + k for k in range(8)] for m in range(4)]
    prompts += [[7000 + k for k in range(20)], [8000 + k for k in range(33)]]
    return prompts


@pytest.fixture(scope="module")
def tight(default_model_path) -> Engine:
    """Room for about two requests at full length (12 blocks of 16 tokens)."""
    return Engine(
        default_model_path, kv_cache_tokens=12 * BLOCK, max_num_batched_tokens=64, decode_reserve=0.02
    )


def test_tiny_pool_with_wrong_estimates_gives_the_roomy_tokens(engine, tight) -> None:
    prompts = _prompts()
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    roomy = _watchdog(lambda: engine.generate(prompts, params))
    small = _watchdog(lambda: tight.generate(prompts, params))
    stats = tight.stats
    assert stats.preemptions > 0, "the pool was meant to run out"
    assert stats.peak_kv_blocks <= tight.num_kv_blocks
    assert len(small) == len(prompts) and [r.index for r in small] == list(range(len(prompts)))
    for k, (a, b) in enumerate(zip(roomy, small, strict=True)):
        assert b.ok and b.finish_reason == "length" and len(b.token_ids) == MAX_TOKENS, (k, b.error)
        assert a.token_ids == b.token_ids, f"request {k} changed under preemption"
    # Sharing still pays, though prefixes were recomputed after preemptions.
    assert stats.prompt_tokens_computed >= engine.stats.prompt_tokens_computed


def test_mixed_lengths_and_eos_under_pressure(engine, tight) -> None:
    """Different max_tokens per request and EOS allowed: outputs still match a roomy run."""
    prompts = _prompts()
    params = [SamplingParams(max_tokens=4 + 7 * (i % 6)) for i in range(len(prompts))]
    roomy = _watchdog(lambda: engine.generate(prompts, params))
    small = _watchdog(lambda: tight.generate(prompts, params))
    assert tight.stats.preemptions > 0, "the pool was meant to run out"
    assert [r.token_ids for r in small] == [r.token_ids for r in roomy]
    assert [r.finish_reason for r in small] == [r.finish_reason for r in roomy]


def test_a_request_that_can_never_fit_is_its_own_error(tight) -> None:
    """Prompt + max_tokens beyond the whole pool: that request fails, the others complete."""
    too_big = list(range(2000, 2000 + 11 * BLOCK))  # 176 prompt tokens + 24 > 192-token pool
    prompts = [[3000 + k for k in range(24)], too_big, [4000 + k for k in range(24)]]
    out = _watchdog(lambda: tight.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)))
    assert [r.ok for r in out] == [True, False, True], [r.error for r in out]
    assert out[1].finish_reason == "error" and out[1].error
    assert all(len(r.token_ids) == MAX_TOKENS for r in (out[0], out[2]))


def test_classify_on_a_tiny_pool(engine, tight) -> None:
    labels = ["positive", "negative"]
    prompts = _prompts()
    roomy = _watchdog(lambda: engine.classify(prompts, labels))
    small = _watchdog(lambda: tight.classify(prompts, labels))
    assert len(small) == len(prompts) and all(r.ok for r in small), [r.error for r in small]
    for a, b in zip(roomy, small, strict=True):
        assert a.label == b.label
        assert all(abs(a.probs[k] - b.probs[k]) < 1e-4 for k in labels)
