"""Plan once: the engine runs a precomputed grouping as given (a job's plan), and the Python API's dedup."""

from __future__ import annotations

import random

import numpy as np
import pytest

from batchllm.engine import SamplingParams
from batchllm.engine.requests import groups_from_plan, prepare
from batchllm.plan import build_plan, shard_plan

PARAMS = SamplingParams(max_tokens=3, ignore_eos=True)


def workload(seed: int = 3) -> list[list[int]]:
    """Four groups of five members (prefixes of 26..70 tokens) and four plain prompts, shuffled."""
    rng = random.Random(seed)
    prompts = []
    for prefix_len in (26, 37, 58, 70):
        prefix = [rng.randrange(100, 40000) for _ in range(prefix_len)]
        prompts += [prefix + [rng.randrange(100, 40000) for _ in range(rng.randint(1, 9))] for _ in range(5)]
    prompts += [[rng.randrange(100, 40000) for _ in range(rng.randint(5, 30))] for _ in range(4)]
    rng.shuffle(prompts)
    return prompts


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return workload()


@pytest.fixture(scope="module")
def plain(engine, prompts):
    return engine.generate(prompts, PARAMS, enable_sharing=False)


def test_the_plans_groups_run_as_given(engine, prompts, plain) -> None:
    plan = build_plan([np.asarray(p, np.int32) for p in prompts], 3, block_size=engine.block_size)
    groups = groups_from_plan(plan, range(len(prompts)))
    shared = engine.generate(prompts, PARAMS, groups=groups)
    stats = engine.stats
    assert [r.token_ids for r in shared] == [r.token_ids for r in plain]
    assert stats.num_groups == plan.num_groups
    assert stats.prompt_tokens_computed == plan.stats.physical_tokens
    assert stats.planned_saving_ratio == pytest.approx(plan.stats.saving_ratio, abs=1e-12)
    assert stats.saving_ratio == pytest.approx(stats.planned_saving_ratio, abs=1e-12)


def test_a_prefix_off_the_block_grid_is_rounded_down(engine, prompts, plain) -> None:
    """A plan made with 8-token blocks on a 16-token engine: prefixes are cut to whole engine blocks."""
    plan = build_plan([np.asarray(p, np.int32) for p in prompts], 3, block_size=8)
    assert any(int(n) % engine.block_size for n in plan.prefix_len), "the case needs an off-grid prefix"
    out = engine.generate(prompts, PARAMS, groups=groups_from_plan(plan, range(len(prompts))))
    assert [r.token_ids for r in out] == [r.token_ids for r in plain]
    members = plan.members.tolist()
    for k in range(plan.num_groups):
        lo, hi = int(plan.member_offsets[k]), int(plan.member_offsets[k + 1])
        rounded = int(plan.prefix_len[k]) // engine.block_size * engine.block_size
        for m in members[lo:hi]:
            assert out[m].cached_tokens == (rounded if hi - lo > 1 else 0)
    assert engine.stats.saving_ratio == pytest.approx(engine.stats.planned_saving_ratio, abs=1e-12)


def test_shards_of_one_plan(engine, prompts, plain) -> None:
    """Each shard gets its groups as positions into its own prompt list; answers are unchanged."""
    plan = build_plan([np.asarray(p, np.int32) for p in prompts], 3, block_size=engine.block_size)
    seen = []
    for part in shard_plan(plan, 3):
        inputs = part.members.tolist()[::-1]  # any order of the shard's prompts works
        out = engine.generate([prompts[i] for i in inputs], PARAMS, groups=groups_from_plan(part, inputs))
        assert [r.token_ids for r in out] == [plain[i].token_ids for i in inputs]
        seen += inputs
    assert sorted(seen) == list(range(len(prompts)))


def test_inputs_outside_the_groups_run_plain(engine, prompts, plain) -> None:
    out = engine.generate(prompts, PARAMS, groups=[(16, [])])
    assert [r.token_ids for r in out] == [r.token_ids for r in plain]
    assert engine.stats.prompt_tokens_computed == sum(len(p) for p in prompts)


def test_bad_groups_are_errors(engine, prompts) -> None:
    with pytest.raises(ValueError, match=r"^groups: input index 99 is out of range"):
        engine.generate(prompts[:3], PARAMS, groups=[(0, [0, 99])])
    with pytest.raises(ValueError, match=r"^groups: input 1 appears in more than one group"):
        engine.generate(prompts[:3], PARAMS, groups=[(0, [0, 1]), (0, [1])])
    with pytest.raises(
        ValueError, match=r"^groups: input \d does not start with its group's 16-token prefix"
    ):
        engine.generate([[1] * 20, [2] * 20], PARAMS, groups=[(16, [0, 1])])
    with pytest.raises(ValueError, match=r"^groups: prefix_len must be"):
        engine.generate([[1] * 20], PARAMS, groups=[(-16, [0])])
    with pytest.raises(ValueError, match=r"^groups: each group must be"):
        engine.generate([[1] * 20], PARAMS, groups=[(16,)])


def test_dedup_follows_the_params() -> None:
    """The planner finds identical prompts; they share one request only with equal deterministic params."""
    p = [np.arange(40), np.arange(40), np.arange(40), np.arange(40), np.arange(100, 130)]
    greedy, seeded = SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, temperature=1.0, seed=5)
    random_ = SamplingParams(max_tokens=4, temperature=1.0)
    batch = prepare(
        p,
        [greedy, random_, greedy, random_, seeded],
        {},
        sharing=True,
        block_size=16,
        rng=random.Random(0),
    )
    inputs = sorted(r.inputs for r in batch.requests)
    assert inputs == [[0, 2], [1], [3], [4]]
    (copies,) = [g for g in batch.groups if len(g[1]) == 3]
    assert copies[0] == 40  # the copies that run apart share their prompt (the scheduler cuts it to 32)
    assert batch.planned_physical == 32 + 3 * 8 + 30
    off = prepare(p, [greedy] * 5, {}, sharing=False, block_size=16, rng=random.Random(0))
    assert [r.inputs for r in off.requests] == [[0], [1], [2], [3], [4]]


def test_copies_in_a_shard_join_their_members_group() -> None:
    prompts = [np.arange(50), np.arange(50), np.arange(200, 230)]
    plan = build_plan(prompts, 2, block_size=16)
    assert plan.duplicate_of.tolist() == [0, 0, 2]
    groups = groups_from_plan(plan, [2, 1, 0])
    assert sorted(groups) == [(0, [0]), (50, [2, 1])]
