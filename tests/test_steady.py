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
    # the logits GEMM's rows per call: its kernel (and the last bits of a near tie) depends on them
    logits_rows: list[int] = []
    compute_logits = engine.model.compute_logits
    monkeypatch.setattr(
        engine.model, "compute_logits", lambda h: logits_rows.append(h.shape[0]) or compute_logits(h)
    )
    riding = engine.generate(prompts, params)
    stats, riding_rows = engine.stats, logits_rows.copy()
    assert stats.steady_steps > runs, (stats.steady_steps, runs)
    assert _fields(riding) == _fields(alone)
    logits_rows.clear()
    with monkeypatch.context() as m:
        m.setattr(Scheduler, "steady", lambda self, batch, ended: False)
        loop = engine.generate(prompts, params)
    assert _fields(riding) == _fields(loop)
    assert (stats.steps, stats.tokens_computed) == (engine.stats.steps, engine.stats.tokens_computed)
    assert riding_rows == logits_rows
    assert all(r.latency_s > 0 for r in riding)


def _first_unseen(tokens: list[int], at: int) -> int:
    """An id the request samples first at or after ``at``: as a stop id it ends the request there."""
    return next(tokens[k] for k in range(at, len(tokens)) if tokens[k] not in tokens[:k])


def _observer(layouts: list, scratch_slot: int) -> Callable:
    """Records each step's layout as the model runs it: a decode step's live rows (position, prefix
    length; padding rows write to the scratch block) and its groups; a prefill step's groups."""

    def observe(layout) -> None:
        if not layout.is_decode:
            layouts.append(("prefill", layout.num_groups))
            return
        live = layout.slot_mapping != scratch_slot
        rows = sorted(zip(layout.positions[live].tolist(), layout.start_pos[live].tolist(), strict=True))
        layouts.append((rows, layout.num_groups))

    return observe


def _loop_and_riding(engine: Engine, prompts, params, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The engine's own step loop, then steady runs with ended rows riding (a GPU's graph sizes): per run
    the results, steps, steady steps and the layouts each step ran."""
    runs = []
    for loop in (True, False):
        layouts: list = []
        observe = _observer(layouts, engine.runner.attention.scratch_block * engine.block_size)
        engine.runner.observers.append(observe)
        engine.runner.graphs = None if loop else PaddedSizes(8)  # type: ignore[assignment]
        with monkeypatch.context() as m:
            if loop:
                m.setattr(Scheduler, "steady", lambda self, batch, ended: False)
            results = engine.generate(prompts, params)
        engine.runner.observers.remove(observe)
        runs.append((_fields(results), engine.stats.steps, engine.stats.steady_steps, layouts))
    return runs


def test_rows_do_not_ride_while_admission_waits(tmp_path, monkeypatch: pytest.MonkeyPatch, checked) -> None:
    """A row that ends inside a steady run while requests wait for KV hands the run back: the loop admits
    into the KV it frees at the next step, so a riding row would hold admission back until the run's end
    (here 318 steps against the loop's 197)."""
    from bench.generate import write_tiny_model

    engine = Engine(write_tiny_model(tmp_path / "tiny"), device="cpu", load_format="dummy", seed=0,
                    kv_cache_tokens=512, enable_sharing=False)  # fmt: skip
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 512, 20).tolist() for _ in range(16)]
    free = engine.generate(prompts, SamplingParams(max_tokens=80, ignore_eos=True))
    params = [
        SamplingParams(
            max_tokens=80, ignore_eos=True, stop_token_ids=[_first_unseen(r.token_ids, 5)] * (i % 2)
        )
        for i, r in enumerate(free)
    ]
    (loop, loop_steps, _, loop_layouts), (riding, steps, steady, layouts) = _loop_and_riding(
        engine, prompts, params, monkeypatch
    )
    assert riding == loop and steady > 0
    assert {r["finish_reason"] for r in riding} == {"stop", "length"}
    assert steps == loop_steps and layouts == loop_layouts


def test_a_run_after_ends_keeps_the_loops_two_level_choice(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two members share a prefix and one ends at a stop id: the step after the end runs the other one
    plain (a group of one reads its prefix itself), in a steady run as in the loop."""
    from bench.generate import write_tiny_model

    engine = Engine(write_tiny_model(tmp_path / "tiny"), device="cpu", load_format="dummy", seed=0)
    rng = np.random.default_rng(2)
    prefix = rng.integers(3, 512, 144).tolist()
    prompts = [prefix + rng.integers(3, 512, 3 + i).tolist() for i in range(2)]
    free = engine.generate(prompts, SamplingParams(max_tokens=30, ignore_eos=True))
    stop = _first_unseen(free[0].token_ids, 5)
    params = [
        SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[stop]),
        SamplingParams(max_tokens=30),
    ]
    (loop, _, _, loop_layouts), (riding, _, steady, layouts) = _loop_and_riding(
        engine, prompts, params, monkeypatch
    )
    assert riding == loop and steady > 0 and len(riding[0]["token_ids"]) < 30
    assert layouts == loop_layouts
    assert loop_layouts[-1][1] == 0  # the member going on alone runs plain


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
