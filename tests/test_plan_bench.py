"""The planner benchmarks run end to end at a small size, and the synthetic workload has its stated shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batchllm.plan import build_plan
from bench import plan_scale
from bench.workloads import shared_prefix_workload, templated_prompts


def test_plan_scale_json(capsys: pytest.CaptureFixture[str]) -> None:
    plan_scale.main(["--prompts", "3000", "--json", "--baseline", "radix", "--baseline-prompts", "400"])
    out = json.loads(capsys.readouterr().out)
    for key in ("prompts", "seconds", "peak_rss_mb", "saving_ratio"):
        assert key in out
    assert out["prompts"] == 3000
    assert 0.0 < out["saving_ratio"] < 1.0
    assert out["baseline"]["same_groups"] is True


def test_templated_workload_shape() -> None:
    w = templated_prompts(20_000, seed=1)
    lengths = w.table.lengths
    assert 250 < lengths.mean() < 350
    assert w.max_tokens.min() >= 1 and w.max_tokens.max() <= 512
    again = templated_prompts(20_000, seed=1)
    assert np.array_equal(w.table.values, again.table.values)
    stats = build_plan(w.table, w.max_tokens).stats
    assert 0.005 < stats.duplicates / stats.prompts < 0.02
    assert stats.groups > 300  # templates, plus nested few-shot/field groups


def test_shared_prefix_workload_matches_its_parameters() -> None:
    w = shared_prefix_workload(prefix=64, suffix=8, decode=5, members=4, groups=3)
    plan = build_plan(w.table, w.max_tokens, block_size=16)
    assert sorted(plan.prefix_len.tolist()) == [64, 64, 64]
    assert plan.stats.physical_tokens == 3 * 64 + 12 * 8


def test_templated_duplicates_repeat_their_source_row() -> None:
    """A duplicate row is its source row as that row ends up (prompt and max_tokens), chains included."""
    w = templated_prompts(20_000, seed=1, duplicates=0.05)
    t = w.table
    by_prompt: dict[bytes, int] = {}
    repeats = 0
    for i in range(len(t.lengths)):
        key = t.values[t.offsets[i] : t.offsets[i + 1]].tobytes()
        first = by_prompt.setdefault(key, i)
        if first != i:
            repeats += 1
            assert w.max_tokens[i] == w.max_tokens[first], i
    assert repeats > 500  # ~5% of 20,000 rows, most of them a different row than their source
