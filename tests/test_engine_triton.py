"""The engine end to end on the Triton backend (its interpreter on CPU): mixed steps whose decode rows
run in a launch of their own, pipelined decode, shared prefixes; greedy tokens equal the torch
reference backend's."""

from __future__ import annotations

import numpy as np
import pytest

from batchllm.engine import Engine, SamplingParams


def test_triton_engine_equals_the_reference(tmp_path, monkeypatch) -> None:
    pytest.importorskip("triton")
    from batchllm.engine.attention import triton as tb
    from bench.generate import write_tiny_model

    monkeypatch.setattr(tb, "DECODE_SPLIT_MIN_ROWS", 4)  # the tiny batch's mixed steps split
    folder = write_tiny_model(tmp_path / "tiny")
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(3):  # three groups: 32 shared tokens, members of their own after them
        prefix = rng.integers(4, 500, 32).tolist()
        prompts += [prefix + rng.integers(4, 500, int(rng.integers(2, 9))).tolist() for _ in range(6)]
    prompts += [rng.integers(4, 500, 20).tolist() for _ in range(4)]  # plain requests
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    kw = dict(device="cpu", load_format="dummy", max_num_batched_tokens=48, kv_cache_tokens=4096)
    want = Engine(folder, attention="torch", pipelined_decode=False, **kw).generate(prompts, params)
    engine = Engine(folder, attention="triton", **kw)
    got = engine.generate(prompts, params)
    assert engine.stats.mixed_steps > 0 and engine.stats.prefixes_computed == 3
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
