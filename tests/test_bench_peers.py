"""bench.peers and bench.generate's peer side on the CPU, with a stand-in for vLLM: each vLLM run is
repeated as the native one is (the prefix cache reset before each), a failed run is no result, and the
peer runs the native run's dtype."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bench import generate, peers
from bench.floor import Case


class FakeLLM:
    """vLLM's LLM as bench.vllm_peer.run_once uses it: each generate call takes a little longer than the
    last, and may return every output one token short (a failed run)."""

    def __init__(self, short: bool = False) -> None:
        self.resets, self.calls, self.short = 0, 0, short
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: 512))

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True

    def generate(self, batch: list, params: Any, use_tqdm: bool = False) -> list:
        self.calls += 1
        time.sleep(0.01 * self.calls)
        n = params.max_tokens - (1 if self.short and len(batch) > 8 else 0)
        return [
            SimpleNamespace(
                prompt_token_ids=p.ids, outputs=[SimpleNamespace(token_ids=[0] * n)], num_cached_tokens=0
            )
            for p in batch
        ]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    made: dict[str, Any] = {}

    class Backend:
        def __init__(self, model: str, device: str, **kw: Any) -> None:
            self.llm, self.init_s, self.version, self.options = (
                FakeLLM(made.get("short", False)),
                0.0,
                "0.24.0",
                kw,
            )
            made["backend"] = self

        def close(self) -> None:
            made["closed"] = True

    sampling = SimpleNamespace(SamplingParams=lambda **kw: SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", sampling)
    monkeypatch.setitem(
        sys.modules,
        "vllm.inputs",
        SimpleNamespace(TokensPrompt=lambda prompt_token_ids: SimpleNamespace(ids=prompt_token_ids)),
    )
    import batchllm.backends.vllm as backend_module

    monkeypatch.setattr(backend_module, "VllmBackend", Backend)
    return SimpleNamespace(made=made)


def _workload() -> peers.Workload:
    case = Case(32, 8, 4, 4, 3)
    return peers.random_workload(case, vocab=512, seed=0)


def test_each_vllm_run_repeats_with_the_cache_reset_before_each(fake_vllm: SimpleNamespace) -> None:
    args = peers.parse_args(
        ["--case", "32,8,4,4,3", "--native-repeat", "3", "--skip", "vllm plan", "--model", "x"]
    )
    assert args.vllm_repeat == 3
    w = _workload()
    peers.run_vllm(args, [w], {}, lambda: None)
    llm = fake_vllm.made["backend"].llm
    assert llm.calls == 1 + 2 * 3 and llm.resets == 2 * 3  # a warm-up, then shuffled and sorted 3 times each
    for name in ("vllm shuffled", "vllm sorted"):
        run = w.runs[name]
        assert len(run["walls_s"]) == 3 and run["wall_s"] == run["walls_s"][-1]
        assert run["walls_s"][0] < run["walls_s"][-1]  # the fake's calls slow down: the last is recorded
    assert fake_vllm.made["closed"]
    assert fake_vllm.made["backend"].options["dtype"] == "float32"  # the native engine's on the CPU


def test_a_failed_vllm_run_is_no_result(fake_vllm: SimpleNamespace) -> None:
    fake_vllm.made["short"] = True
    args = peers.parse_args(["--case", "32,8,4,4,3", "--skip", "vllm plan,vllm sorted", "--model", "x"])
    w = _workload()
    w.runs["native"] = {
        "wall_s": 1.0,
        "requests": 12,
        "req_per_s": 12.0,
        "prompt_tok_per_s": 1.0,
        "walls_s": [1.0],
    }
    peers.run_vllm(args, [w], {}, lambda: None)
    assert w.runs["vllm shuffled"]["wrong_length"] == 12
    text = peers.table([w], {})
    assert "| vllm shuffled | 12 of 12 requests failed |" in text
    assert "| native | 1.00 | 12.00 |" in text


def test_repeats_below_one_are_refused() -> None:
    with pytest.raises(SystemExit):
        peers.parse_args(["--vllm-repeat", "0"])
    with pytest.raises(SystemExit):
        generate.parse_args(["--repeat", "0"])


def test_the_peer_runs_the_native_dtype_and_repeats(tmp_path: Path) -> None:
    args = generate.parse_args(["--repeat", "2", "--kv-tokens", "205000"])
    args.model_max_len = 131072
    cmd = generate.peer_command(
        args, tmp_path, [Case.parse("2000,200,100,16,100")], "float32", 60.0, tmp_path / "v.json"
    )
    joined = " ".join(cmd)
    assert "--dtype float32" in joined and "--repeat 2" in joined and "--kv-tokens 205000" in joined
    assert "--case 2000,200,100,16,100" in joined and "--max-model-len 8192" in joined
    assert np.isclose(float(cmd[cmd.index("--time-budget") + 1]), 60.0)


def test_a_native_run_plans_inside_its_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job plans inside its run: the native wall time includes planning, as vLLM's includes its own
    scheduling."""
    w = _workload()
    planned: list[int] = []

    def slow_plan(self: peers.Workload) -> list[tuple[int, list[int]]]:
        time.sleep(0.05)
        planned.append(1)
        return peers.plan_groups(self.prompts, self.decode, self.block_size)

    monkeypatch.setattr(peers.Workload, "plan", slow_plan)
    engine = SimpleNamespace(generate=lambda prompts, params, groups: groups)
    groups, wall = generate.timed("cpu", peers.planned_generate, engine, w, None)
    assert planned == [1] and wall >= 0.05 and groups == w.groups
