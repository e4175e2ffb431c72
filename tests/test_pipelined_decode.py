"""Pipelined decode (a step's tokens read back after the next step is launched) gives the results of
reading every step's tokens at once: EOS, stop strings, stop token ids, max_tokens, seeded sampling."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from batchllm.engine import Engine, SamplingParams

QUESTIONS = [
    "Is the sky blue? Answer yes or no.",
    "Name a colour.",
    "Count from 1 to 12, comma separated.",
    "Write one short sentence about cats.",
    "What is 2 + 2? Answer with the number only.",
    "Say hello.",
]


def _workload(engine: Engine) -> tuple[list[list[int]], list[SamplingParams]]:
    tok = engine.tokenizer
    prompts, params = [], []
    for i, q in enumerate(QUESTIONS * 3):
        prompts.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])))
        kind = i % 6
        if kind == 0:
            params.append(SamplingParams(max_tokens=24))  # ends at EOS, mostly
        elif kind == 1:
            params.append(SamplingParams(max_tokens=5 + i, ignore_eos=True))
        elif kind == 2:
            params.append(SamplingParams(max_tokens=30, stop=["5"]))
        elif kind == 3:
            params.append(SamplingParams(max_tokens=20, temperature=0.8, seed=i))
        elif kind == 4:
            params.append(SamplingParams(max_tokens=1))
        else:
            params.append(SamplingParams(max_tokens=16, stop_token_ids=[tok.encode(".")[0]]))
    return prompts, params


def _fields(results) -> list[dict]:
    drop = {"latency_s", "first_token_s"}
    return [{k: v for k, v in asdict(r).items() if k not in drop} for r in results]


@pytest.mark.parametrize("budget", [None, 12])
def test_pipelined_equals_synchronous(default_model_path, budget: int | None) -> None:
    """budget 12: chunked prefill beside decodes, and steps that cannot take every running decode."""
    engine = Engine(default_model_path, max_num_batched_tokens=budget)
    prompts, params = _workload(engine)
    piped = engine.generate(prompts, params)
    engine.pipelined_decode = False
    synced = engine.generate(prompts, params)
    assert _fields(piped) == _fields(synced)
    reasons = {r.finish_reason for r in piped}
    assert reasons == {"stop", "length"}, reasons
    assert any(
        r.finish_reason == "stop" and len(r.token_ids) < p.max_tokens
        for r, p in zip(piped, params, strict=True)
    )
    assert all(-1 not in r.token_ids for r in piped)


@pytest.mark.gpu
def test_read_back_waits_for_its_own_step_only() -> None:
    """A step's ids are read back without waiting for the work queued after them (the next step)."""
    import time

    import torch

    from batchllm.engine.pipeline import ReadBack

    ids = torch.arange(5, device="cuda") * 3
    readback = ReadBack(8, ids.device)
    for _ in range(ReadBack.TURNS):  # every buffer once: the next copy reuses the first
        readback.later(ids + 1)
    host, copied = readback.later(ids)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work queued behind the copy
    t = time.perf_counter()
    assert copied is not None
    copied.synchronize()
    got = host.tolist()
    waited = time.perf_counter() - t
    torch.cuda.synchronize()
    assert got == [0, 3, 6, 9, 12] and waited < 0.2
