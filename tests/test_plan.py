"""Property tests of the prefix planner against direct computations and the radix-tree reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.plan import Plan, build_plan, shard_plan
from batchllm.plan import groups as groups_mod
from batchllm.plan import tree as tree_mod
from bench.workloads import shared_prefix_workload
from tests.radix_reference import reference_physical_tokens, reference_plan

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Prompts built from a few shared stems (cut at random depths) plus random tails over a
    tiny vocabulary, so sharing happens at many depths, with exact duplicates and short prompts."""
    vocab = draw(st.integers(2, 6))
    stems = draw(
        st.lists(st.lists(st.integers(0, vocab - 1), min_size=0, max_size=40), min_size=1, max_size=4)
    )
    n = draw(st.integers(0, 40))
    prompts: list[np.ndarray] = []
    for _ in range(n):
        stem = draw(st.sampled_from(stems))
        cut = draw(st.integers(0, len(stem)))
        tail = draw(st.lists(st.integers(0, vocab - 1), min_size=0, max_size=12))
        tokens = stem[:cut] + tail
        if not tokens:
            tokens = [0]
        prompts.append(np.asarray(tokens, dtype=np.int32))
    if prompts and draw(st.booleans()):
        prompts.append(prompts[draw(st.integers(0, len(prompts) - 1))].copy())
    max_tokens = np.asarray(draw(st.lists(st.integers(0, 50), min_size=len(prompts), max_size=len(prompts))))
    block = draw(st.sampled_from([1, 2, 3, 4, 8]))
    return prompts, max_tokens.astype(np.int64), block


def _check_invariants(plan: Plan, prompts: list[np.ndarray]) -> None:
    n = len(prompts)
    members = plan.members
    assert np.unique(members).size == members.size
    assert np.all(plan.duplicate_of[members] == members)
    covered = np.zeros(n, dtype=int)
    np.add.at(covered, plan.duplicate_of, 1)
    assert covered.sum() == n
    assert sorted(plan.inputs().tolist()) == list(range(n))
    slots = plan.input_slots()
    assert np.all(plan.members[slots] == plan.duplicate_of)
    for i in range(n):
        rep = int(plan.duplicate_of[i])
        assert np.array_equal(prompts[i], prompts[rep])
        assert rep <= i
    for g in plan.iter_groups():
        assert g.prefix_len % plan.block_size == 0
        if g.prefix_len == 0:
            assert g.members.size == 1
        else:
            assert g.members.size >= 2
        for m in g.members:
            p = prompts[m]
            assert len(p) - g.prefix_len >= 1  # the member computes at least its last token
            assert np.array_equal(np.concatenate((g.prefix, p[g.prefix_len :])), p)


@SETTINGS
@given(workloads())
def test_plan_invariants_and_stats(work: tuple[list[np.ndarray], np.ndarray, int]) -> None:
    prompts, max_tokens, block = work
    plan = build_plan(prompts, max_tokens, block_size=block)
    _check_invariants(plan, prompts)
    logical = sum(len(p) for p in prompts)
    physical = 0
    for g in plan.iter_groups():
        physical += g.prefix_len + sum(len(prompts[m]) - g.prefix_len for m in g.members)
    s = plan.stats
    assert s.prompts == len(prompts)
    assert s.logical_tokens == logical
    assert s.physical_tokens == physical
    assert s.unique_prompts == len({tuple(p.tolist()) for p in prompts})
    assert s.duplicates == len(prompts) - s.unique_prompts
    if logical:
        assert s.saving_ratio == pytest.approx(1 - physical / logical)
    assert s.groups + s.plain == plan.num_groups
    assert sum(s.sharing_hist.values()) == s.groups == sum(s.prefix_len_hist.values())


@SETTINGS
@given(workloads())
def test_matches_radix_reference(work: tuple[list[np.ndarray], np.ndarray, int]) -> None:
    prompts, max_tokens, block = work
    for maximize in (False, True):
        plan = build_plan(prompts, max_tokens, block_size=block, maximize=maximize)
        ref_groups, ref_plain, ref_dup = reference_plan(prompts, block, maximize=maximize)
        got = sorted((g.prefix_len, sorted(g.members.tolist())) for g in plan.iter_groups() if g.prefix_len)
        got_plain = sorted(int(g.members[0]) for g in plan.iter_groups() if not g.prefix_len)
        assert got == sorted(ref_groups)
        assert got_plain == ref_plain
        assert plan.duplicate_of.tolist() == [ref_dup[i] for i in range(len(prompts))]
        assert plan.stats.physical_tokens == reference_physical_tokens(prompts, ref_groups, ref_plain)


@SETTINGS
@given(workloads())
def test_maximization_never_hurts_and_is_deterministic(
    work: tuple[list[np.ndarray], np.ndarray, int],
) -> None:
    prompts, max_tokens, block = work
    flat = build_plan(prompts, max_tokens, block_size=block, maximize=False)
    best = build_plan(prompts, max_tokens, block_size=block)
    unshared = build_plan(prompts, max_tokens, block_size=block, share=False)
    assert best.stats.physical_tokens <= flat.stats.physical_tokens <= unshared.stats.physical_tokens
    assert best.stats.physical_tokens_first_level == flat.stats.physical_tokens
    again = build_plan([p.copy() for p in prompts], max_tokens.copy(), block_size=block)
    for name in ("prefix_len", "member_offsets", "members", "duplicate_of"):
        assert np.array_equal(getattr(best, name), getattr(again, name))


@SETTINGS
@given(workloads(), st.integers(1, 5))
def test_shards_cover_every_input_once(work: tuple[list[np.ndarray], np.ndarray, int], n: int) -> None:
    prompts, max_tokens, block = work
    plan = build_plan(prompts, max_tokens, block_size=block)
    shards = shard_plan(plan, n)
    assert len(shards) == n
    seen = np.concatenate([s.inputs() for s in shards]) if shards else np.zeros(0, np.int64)
    assert sorted(seen.tolist()) == list(range(len(prompts)))
    assert sum(s.stats.prompts for s in shards) == len(prompts)
    for s in shards:
        _check_invariants_subset(s, prompts)
        ranks = [_group_rank(plan, g) for g in s.iter_groups()]
        assert ranks == sorted(ranks)  # shards keep the plan's execution order
        shared = [
            r for r, g in zip(ranks, s.iter_groups(), strict=True) if g.prefix_len and len(g.members) > 1
        ]
        assert len(shared) == len(set(shared))  # a group's pieces on one shard share its prefix once


def _check_invariants_subset(plan: Plan, prompts: list[np.ndarray]) -> None:
    for g in plan.iter_groups():
        for m in g.members:
            p = prompts[m]
            assert len(p) > g.prefix_len
            assert np.array_equal(p[: g.prefix_len], g.prefix)


def _group_rank(plan: Plan, g: object) -> int:
    first = int(g.members[0])  # type: ignore[attr-defined]
    slot = int(np.flatnonzero(plan.members == first)[0])
    return int(np.searchsorted(plan.member_offsets, slot, side="right") - 1)


def test_share_false_is_input_order_and_plain() -> None:
    prompts = [np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 4, 6]), np.array([1, 2, 3, 4, 5])]
    plan = build_plan(prompts, 4, block_size=2, share=False)
    assert plan.members.tolist() == [0, 1]
    assert plan.prefix_len.tolist() == [0, 0]
    assert plan.duplicate_of.tolist() == [0, 1, 0]
    keep = build_plan(prompts, 4, block_size=2, share=False, dedup=False)
    assert keep.members.tolist() == [0, 1, 2]
    shared = build_plan(prompts, 4, block_size=2)
    assert shared.prefix_len.tolist() == [4]


def test_arrow_and_flat_inputs_agree() -> None:
    rng = np.random.default_rng(3)
    stem = rng.integers(0, 50, 30)
    prompts = [
        np.concatenate((stem[: rng.integers(0, 30)], rng.integers(0, 50, rng.integers(1, 9))))
        for _ in range(200)
    ]
    base = build_plan(prompts, 8, block_size=4)
    arrow = pa.array([p.tolist() for p in prompts], type=pa.list_(pa.int32()))
    chunked = pa.chunked_array([arrow[:70], arrow[70:]])
    sliced = pa.array([[9, 9]] + [p.tolist() for p in prompts], type=pa.large_list(pa.int32()))[1:]
    for other in (arrow, chunked, sliced):
        plan = build_plan(other, 8, block_size=4)
        assert np.array_equal(plan.members, base.members)
        assert np.array_equal(plan.prefix_len, base.prefix_len)
    table = base.to_arrow()
    assert table.num_rows == base.num_groups
    assert table.column("members").to_pylist() == [g.members.tolist() for g in base.iter_groups()]


def test_order_puts_decode_heavy_groups_first() -> None:
    stem_a, stem_b = list(range(100, 132)), list(range(200, 232))
    prompts = [np.array([*stem_a, i]) for i in range(3)] + [np.array([*stem_b, i]) for i in range(3)]
    max_tokens = np.array([1, 1, 1, 500, 500, 500])
    plan = build_plan(prompts, max_tokens, block_size=16)
    assert [sorted(g.members.tolist()) for g in plan.iter_groups()] == [[3, 4, 5], [0, 1, 2]]


def test_gain_rule_promotes_only_when_it_pays() -> None:
    c = list(range(1000, 1032))  # first-level prefix: 32 tokens (2 blocks of 16)
    g = list(range(2000, 2016))  # one more block shared by some members
    few = [np.array([*c, *g, 7, i]) for i in range(2)]  # (2-1)*16 - 32 < 0: stays in c
    many = [np.array([*c, *g, 8, i]) for i in range(4)]  # (4-1)*16 - 32 > 0: promoted
    others = [np.array([*c, 9, i]) for i in range(3)]
    plan = build_plan(few + others, 1, block_size=16)
    assert sorted(plan.prefix_len.tolist()) == [32]
    plan = build_plan(many + others, 1, block_size=16)
    assert sorted(plan.prefix_len.tolist()) == [32, 48]
    assert sorted(plan.stats.sharing_hist.values()) == [1, 1]


def test_hash_collisions_cost_time_not_correctness(monkeypatch: pytest.MonkeyPatch) -> None:
    """With seed 0 every block hashes alike: the exact checks must notice and rebuild."""
    real = tree_mod.hash_words
    seeds: list[int] = []

    def colliding(words: np.ndarray, seed: int) -> np.ndarray:
        seeds.append(seed)
        h = real(words, seed)
        return np.ones_like(h) if seed == 0 else h

    monkeypatch.setattr(tree_mod, "hash_words", colliding)
    monkeypatch.setattr(groups_mod, "hash_words", colliding)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 100, rng.integers(1, 40)).astype(np.int32) for _ in range(50)]
    prompts += [np.array([5] * 20 + [i]) for i in range(4)]
    prompts += [np.array([5] * 19 + [7, 1]), np.array([5] * 19 + [7, 2]), np.array([5] * 19 + [7, 1])]
    plan = build_plan(prompts, 1, block_size=4)
    _check_invariants(plan, prompts)
    assert plan.stats.duplicates == 1
    assert plan.prefix_len.max() == 16
    assert seeds[0] == 0 and max(seeds) == 1


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        build_plan([np.array([1, 2]), np.array([], dtype=np.int32)])
    with pytest.raises(ValueError):
        build_plan([np.array([1, 2])], block_size=0)
    with pytest.raises(TypeError):
        build_plan([np.array([1.5, 2.0])])
    empty = build_plan([], 1)
    assert empty.num_groups == 0 and empty.stats.saving_ratio == 0.0


def _shard_costs(shards: list[Plan]) -> np.ndarray:
    return np.array([s.stats.physical_tokens + s.stats.decode_tokens for s in shards], dtype=float)


def test_shard_splits_a_dominant_group_by_members() -> None:
    w = shared_prefix_workload(prefix=256, suffix=16, decode=10, members=1000, groups=1)
    plan = build_plan(w.table, w.max_tokens)
    shards = shard_plan(plan, 4)
    assert [s.num_groups for s in shards] == [1, 1, 1, 1]
    assert all(s.prefix_len.tolist() == [256] for s in shards)
    assert sorted(np.concatenate([s.members for s in shards]).tolist()) == list(range(1000))
    costs = _shard_costs(shards)
    assert costs.max() / costs.mean() < 1.02
    assert sum(s.stats.physical_tokens for s in shards) == plan.stats.physical_tokens + 3 * 256
    whole = shard_plan(plan, 4, split=False)
    assert sorted(s.num_groups for s in whole) == [0, 0, 0, 1]


def test_pieces_of_a_group_on_one_shard_are_one_group() -> None:
    """A group cut where it overflows a shard can have a later piece come back to that shard: the pieces
    are then one group there, its prefix computed once (five members of one 16-token prefix, 2 shards)."""
    lengths = (82, 129, 110, 18, 6)
    prompts = [np.r_[np.arange(16), 1000 * (i + 1) + np.arange(k)] for i, k in enumerate(lengths)]
    plan = build_plan(prompts, np.zeros(5, np.int64), block_size=16)
    assert plan.prefix_len.tolist() == [16]
    shards = shard_plan(plan, 2)
    assert [s.num_groups for s in shards] == [1, 1]  # the pieces that fell on one shard were two groups
    assert sum(s.stats.physical_tokens for s in shards) == plan.stats.physical_tokens + 16


def test_shard_keeps_a_group_whole_when_its_prefix_dominates() -> None:
    w = shared_prefix_workload(prefix=2048, suffix=16, decode=10, members=10, groups=1)
    shards = shard_plan(build_plan(w.table, w.max_tokens), 4)
    assert sorted(s.num_groups for s in shards) == [0, 0, 0, 1]


def test_shard_balances_many_small_groups() -> None:
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 30_000, rng.integers(5, 400)) for _ in range(3000)]
    max_tokens = rng.integers(1, 300, len(prompts))
    plan = build_plan(prompts, max_tokens)
    shards = shard_plan(plan, 3)
    assert sorted(np.concatenate([s.inputs() for s in shards]).tolist()) == list(range(3000))
    costs = _shard_costs(shards)
    assert costs.max() / costs.mean() < 1.01


def test_a_sharded_plan_reports_what_its_shards_compute() -> None:
    """A group split across shards computes its prefix once per shard: the job's planned saving says so
    (the engine's achieved saving counts it)."""
    from batchllm.job import plan_prompts

    w = shared_prefix_workload(prefix=256, suffix=16, decode=10, members=1000, groups=1)
    table = w.table
    prompts = [table.values[table.offsets[i] : table.offsets[i + 1]] for i in range(1000)]
    whole = plan_prompts(prompts, w.max_tokens, 16, 1)
    info = plan_prompts(prompts, w.max_tokens, 16, 4)
    assert info.stats["physical_tokens"] == whole.stats["physical_tokens"] + 3 * 256
    assert info.stats["physical_tokens"] == sum(p.stats.physical_tokens for p in info.parts)
    assert info.stats["saving_ratio"] < whole.stats["saving_ratio"]
