"""The engine end to end on the Triton backend (its interpreter on CPU): mixed steps whose decode rows
run in a launch of their own, pipelined decode, shared prefixes, with and without the fused
elementwise kernels (CUDA's path); greedy tokens equal the torch reference backend's."""

from __future__ import annotations

import numpy as np
import pytest

from batchllm.engine import Engine, SamplingParams


def test_triton_engine_equals_the_reference(tmp_path, monkeypatch) -> None:
    pytest.importorskip("triton")
    from batchllm.engine.attention import triton as tb
    from bench.gpu_check import build_model

    monkeypatch.setattr(tb, "DECODE_SPLIT_MIN_ROWS", 4)  # the tiny batch's mixed steps split
    folder = tmp_path / "model"  # weights wide enough that attention decides tokens (dummy's 0.02 does not)
    build_model(folder, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(3):  # three groups: 32 shared tokens, members of their own after them
        prefix = rng.integers(4, 500, 32).tolist()
        prompts += [prefix + rng.integers(4, 500, int(rng.integers(2, 9))).tolist() for _ in range(6)]
    prompts += [rng.integers(4, 500, 20).tolist() for _ in range(4)]  # plain requests
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    kw = dict(device="cpu", max_num_batched_tokens=48, kv_cache_tokens=4096)
    want = Engine(folder, attention="torch", pipelined_decode=False, **kw).generate(prompts, params)
    for fused in (False, True):
        engine = Engine(folder, attention="triton", **kw)
        engine.model.use_fused_kernels(fused)  # CUDA's path: norms, SiLU, RoPE + KV store as Triton kernels
        got = engine.generate(prompts, params)
        assert engine.stats.mixed_steps > 0 and engine.stats.prefixes_computed == 3
        assert [r.token_ids for r in got] == [r.token_ids for r in want], f"fused kernels {fused}"


def test_decode_steps_on_graph_buffers_equal_the_reference(tmp_path, monkeypatch) -> None:
    """Decode steps on a CUDA graph's static buffers (padded rows, empty group slots, one staging copy,
    ends riding in steady runs), run eagerly here as at a key's first steps on the GPU, give the torch
    reference backend's tokens."""
    pytest.importorskip("triton")
    from batchllm.engine.graphs import DecodeGraphs
    from batchllm.engine.steady import SteadyDecode
    from bench.generate import write_tiny_model

    folder = write_tiny_model(tmp_path / "tiny")
    rng = np.random.default_rng(1)
    prompts = []
    # three groups of 80 shared tokens (two-level pays with 3 members left too), then two plain
    for members in (5, 4, 4):
        prefix = rng.integers(4, 500, 80).tolist()
        prompts += [prefix + rng.integers(4, 500, int(rng.integers(2, 6))).tolist() for _ in range(members)]
    prompts += [rng.integers(4, 500, 12).tolist() for _ in range(2)]
    kw = dict(device="cpu", load_format="dummy", kv_cache_tokens=2048)
    reference = Engine(folder, attention="torch", pipelined_decode=False, **kw)
    free = reference.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    # four requests end early, at an id they sample mid-run (as at EOS): they ride in steady runs
    params = [
        SamplingParams(max_tokens=12, stop_token_ids=(r.token_ids[5],) if i % 4 == 1 else ())
        for i, r in enumerate(free)
    ]
    want = reference.generate(prompts, params)
    engine = Engine(folder, attention="triton", **kw)
    runner = engine.runner
    runner.graphs = graphs = DecodeGraphs(runner.model, runner.attention, measured_padding=False)
    rides: list[bool] = []  # each time a steady run found a row ended: did it ride on?
    decide = SteadyDecode._rides
    monkeypatch.setattr(
        SteadyDecode, "_rides", lambda run, ending: rides.append(decide(run, ending)) or rides[-1]
    )
    got = engine.generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert True in rides, rides
    assert sum(r.finish_reason == "stop" for r in got) == 4
    assert graphs.captured() == [] and engine.stats.steady_steps > 0
    # 15 rows and fewer padded to 16, three groups in four slots, 16 table columns (the longest has 6)
    assert (16, 4, 16) in graphs.graphs and {width for *_, width in graphs.graphs} == {16}
    # a reset drops every key's buffers (bench.config_ab: graphs keep the launch configuration they were
    # recorded with); the next run builds them again and decodes the same tokens
    graphs.reset()
    assert graphs.graphs == {}
    assert [r.token_ids for r in engine.generate(prompts, params)] == [r.token_ids for r in want]
    assert (16, 4, 16) in graphs.graphs
