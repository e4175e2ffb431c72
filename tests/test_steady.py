"""Steady decode (steady.py) gives the results of the engine's own step loop, step for step: EOS and
stop ids read back in the middle of a run, ends by max_tokens and by max_model_len, seeded sampling,
shared prefixes, and a KV pool too small for every group at once (admission waits between runs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pytest

from batchllm.engine import Engine, SamplingParams
from batchllm.engine.scheduler import Scheduler
from bench.host_step import PaddedSizes

SYSTEM = "You are a careful assistant. Answer briefly and plainly, in one short sentence or less."
QUESTIONS = [
    "Name a colour.",
    "Say hello.",
    "What is 2 + 2?",
    "Name a fruit.",
    "Is ice cold?",
    "Name a city.",
]


# one request of each kind in turn: ends at EOS (mostly), by length, sampled, at a stop id (``stop``),
# long (the last ones run alone)
KINDS: list[Callable[[int, int], SamplingParams]] = [
    lambda i, stop: SamplingParams(max_tokens=24),
    lambda i, stop: SamplingParams(max_tokens=8 + i, ignore_eos=True),
    lambda i, stop: SamplingParams(max_tokens=20, temperature=0.8, seed=i),
    lambda i, stop: SamplingParams(max_tokens=16, stop_token_ids=[stop]),
    lambda i, stop: SamplingParams(max_tokens=40, ignore_eos=True),
]


def _params(n: int, stop: int) -> list[SamplingParams]:
    return [KINDS[i % len(KINDS)](i, stop) for i in range(n)]


def _workload(engine: Engine) -> tuple[list[list[int]], list[SamplingParams]]:
    tok = engine.tokenizer
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS * 4]
    prompts = [tok.encode(tok.apply_chat_template(chat)) for chat in chats]
    return prompts, _params(len(prompts), tok.encode(".")[0])


def _fields(results) -> list[dict]:
    drop = {"latency_s", "first_token_s"}
    return [{k: v for k, v in asdict(r).items() if k not in drop} for r in results]


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block tables and the pool agree after every step the engine books (steady runs in between)."""
    done = Scheduler.on_step_done

    def on_step_done(self: Scheduler, *args, **kwargs):
        out = done(self, *args, **kwargs)
        self.check_integrity()
        return out

    monkeypatch.setattr(Scheduler, "on_step_done", on_step_done)


@pytest.mark.parametrize("kv_tokens", [None, 1024])
def test_steady_equals_the_step_loop(
    default_model_path, monkeypatch: pytest.MonkeyPatch, checked: None, kv_tokens: int | None
) -> None:
    """kv_tokens 1024: about a third of the requests at once, so runs end when admission resumes."""
    engine = Engine(default_model_path, kv_cache_tokens=kv_tokens)
    prompts, params = _workload(engine)
    steady = engine.generate(prompts, params)
    stats = engine.stats
    assert stats.steady_steps > 0
    assert stats.prefill_s + stats.decode_s + stats.host_s <= stats.wall_s  # each moment counted once
    with monkeypatch.context() as m:
        m.setattr(Scheduler, "steady", lambda self, batch, ended: False)
        loop = engine.generate(prompts, params)
    assert engine.stats.steady_steps == 0
    assert _fields(steady) == _fields(loop)
    assert (stats.steps, stats.tokens_computed) == (engine.stats.steps, engine.stats.tokens_computed)
    reasons = {r.finish_reason for r in steady}
    assert reasons == {"stop", "length"}, reasons
    assert all(-1 not in r.token_ids for r in steady)
    engine.pipelined_decode = False  # every step read back at once: never steady
    assert _fields(engine.generate(prompts, params)) == _fields(steady)


@pytest.mark.parametrize("kv_tokens", [None, 1024])
def test_ended_sequences_ride_on_as_padding(
    default_model_path, monkeypatch: pytest.MonkeyPatch, checked: None, kv_tokens: int | None
) -> None:
    """Sequences that end (EOS, a stop id) inside a steady run ride on as padding while the step keeps its
    graph key (padded size, group slots, table width), and a run may start right after a step that
    ended sequences when nothing waits for admission: longer runs, the loop's results and counts."""
    engine = Engine(default_model_path, kv_cache_tokens=kv_tokens)
    prompts, params = _workload(engine)
    alone = engine.generate(prompts, params)
    runs = engine.stats.steady_steps
    engine.runner.graphs = PaddedSizes(8)  # type: ignore[assignment]  # a GPU's graph sizes, every 8 rows
    riding = engine.generate(prompts, params)
    stats = engine.stats
    assert stats.steady_steps > runs, (stats.steady_steps, runs)
    assert _fields(riding) == _fields(alone)
    with monkeypatch.context() as m:
        m.setattr(Scheduler, "steady", lambda self, batch, ended: False)
        loop = engine.generate(prompts, params)
    assert _fields(riding) == _fields(loop)
    assert (stats.steps, stats.tokens_computed) == (engine.stats.steps, engine.stats.tokens_computed)
    assert all(r.latency_s > 0 for r in riding)


def test_steady_runs_every_decode_step_it_can(default_model_path) -> None:
    """Equal lengths, no EOS: the engine's loop books the first token (prefill), the first decode step
    (it finds the run) and the last (ends by length); steady decode runs every step between."""
    engine = Engine(default_model_path)
    prompts, _ = _workload(engine)
    engine.generate(prompts, SamplingParams(max_tokens=30, ignore_eos=True))
    stats = engine.stats
    assert stats.decode_steps == 29 and stats.steady_steps == 27, stats
    assert stats.steps == stats.decode_steps + 2  # the shared prefix, then the members' own prompts


def test_steady_ends_at_max_model_len(default_model_path, checked: None) -> None:
    """Sequences end by the context limit, at different steps, with nothing else ending them."""
    engine = Engine(default_model_path)
    prompts, _ = _workload(engine)
    longest = max(len(p) for p in prompts)
    engine.max_model_len = longest + 12
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    results = engine.generate(prompts, params)
    assert engine.stats.steady_steps > 0
    for p, r in zip(prompts, results, strict=True):
        assert r.finish_reason == "length" and len(p) + len(r.token_ids) == longest + 12
    engine.pipelined_decode = False
    assert _fields(engine.generate(prompts, params)) == _fields(results)


@pytest.mark.gpu
def test_steady_equals_the_step_loop_on_cuda(
    tmp_path, monkeypatch: pytest.MonkeyPatch, checked: None
) -> None:
    """bf16 with CUDA graphs (random weights): a steady step replays the graph the engine's loop would,
    on the same layout, so the same tokens; EOS (id 2) and stop ids come up in the middle of runs."""
    from bench.gpu_check import build_model

    build_model(tmp_path)
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 512, 48).tolist()
    prompts = [prefix + rng.integers(3, 512, 5 + i % 7).tolist() for i in range(40)]
    params = _params(len(prompts), 7)
    engine = Engine(tmp_path, device="cuda")
    steady = engine.generate(prompts, params)
    assert engine.stats.steady_steps > 0
    with monkeypatch.context() as m:
        m.setattr(Scheduler, "steady", lambda self, batch, ended: False)
        loop = engine.generate(prompts, params)
    assert _fields(steady) == _fields(loop)
