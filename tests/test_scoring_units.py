"""Torch-free parts of prefill-only scoring: the label trie, tree units (mask, positions, reads), packing
bins, and the prefill scheduler's policy (SPF on cache-miss tokens, starvation guard, KV lifetime)."""

from __future__ import annotations

import numpy as np
import pytest

from batchllm.engine.labels import LabelSet
from batchllm.engine.packing import NO_END, _bins, build_unit
from batchllm.engine.prefill_scheduler import PrefillScheduler
from batchllm.engine.sequence import Sequence, SequenceStatus

# "very good" / "very bad" share "very"; "so so so" has two nodes; "ok" is one token
LABELS = LabelSet.from_token_ids(
    ["very good", "very bad", "ok", "so so so"], [[7, 1], [7, 2], [3], [5, 5, 5]]
)


def test_label_trie_in_depth_first_order() -> None:
    assert LABELS.node_tokens.tolist() == [5, 5, 7]  # (5,), (5, 5), (7,)
    assert LABELS.node_depth.tolist() == [1, 2, 1]
    assert LABELS.node_end.tolist() == [2, 2, 3]
    terms = set(
        zip(LABELS.term_label.tolist(), LABELS.term_reader.tolist(), LABELS.term_token.tolist(), strict=True)
    )
    assert terms == {(0, 0, 7), (0, 3, 1), (1, 0, 7), (1, 3, 2), (2, 0, 3), (3, 0, 5), (3, 1, 5), (3, 2, 5)}
    assert LABELS.max_depth == 2
    single = LabelSet.from_token_ids(["a", "b"], [[1], [2]])
    assert single.num_nodes == 0 and single.first_tokens.tolist() == [1, 2]


def test_label_sets_that_cannot_be_scored() -> None:
    with pytest.raises(ValueError, match="encode to the same tokens"):
        LabelSet.from_token_ids(["a", "b"], [[1, 2], [1, 2]])
    with pytest.raises(ValueError, match="at least one token"):
        LabelSet.from_token_ids(["a", "b"], [[1], []])

    class Empty:
        def encode(self, text: str) -> list[int]:
            return [] if text == "\u200b" else [9]

    with pytest.raises(ValueError, match="encodes to no token"):
        LabelSet.build(["yes", "\u200b"], Empty())


def _visible(unit, trunk: int, parents: dict[int, int]) -> np.ndarray:
    """Brute-force tree mask: k is visible to q when k is q or an ancestor of q (the trunk is a chain)."""
    n = unit.num_tokens
    vis = np.zeros((n, n), dtype=bool)
    for q in range(n):
        k = q
        while k >= 0:
            vis[q, k] = True
            k = parents.get(k, k - 1) if k >= trunk else k - 1
    return vis


def test_tree_unit_mask_positions_and_reads() -> None:
    trunk = np.array([11, 12, 13, 14])
    items = [(0, np.array([21, 22])), (1, np.array([31])), (2, np.array([41, 42, 43]))]
    unit = build_unit(trunk, items, LABELS)
    # parents: each item hangs off the trunk's last token; nodes off the item's last token / their parent node
    parents: dict[int, int] = {}
    start, rope_want, reads_want = 4, list(range(4)), []
    for _, own in items:
        n = own.size
        parents.update({start + i: (3 if i == 0 else start + i - 1) for i in range(n)})
        last = start + n - 1
        node_parent = {0: last, 1: last + 1, 2: last}  # (5,) <- item, (5,5) <- (5,), (7,) <- item
        parents.update({last + 1 + k: p for k, p in node_parent.items()})
        rope_want += list(range(4, 4 + n)) + [3 + n + d for d in (1, 2, 1)]
        reads_want += [last, last + 1, last + 2, last + 3]
        start = last + 4
    ends = unit.key_ends.astype(np.int64)
    q, k = np.arange(unit.num_tokens)[:, None], np.arange(unit.num_tokens)[None, :]
    np.testing.assert_array_equal((k <= q) & (q < ends[None, :]), _visible(unit, 4, parents))
    assert unit.rope.tolist() == rope_want
    assert unit.reads.tolist() == reads_want
    assert unit.read_item.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert unit.read_reader.tolist() == [0, 1, 2, 3] * 3
    assert unit.num_label_tokens == 9 and unit.requests == [0, 1, 2]
    assert (ends[:4] == NO_END).all()


def test_plain_unit_has_no_mask() -> None:
    single = LabelSet.from_token_ids(["a", "b"], [[1], [2]])
    unit = build_unit(np.array([1, 2]), [(0, np.array([3, 4]))], single)
    assert unit.key_ends is None and unit.rope is None and unit.reads.tolist() == [3]


def test_bins_respect_the_token_budget() -> None:
    assert _bins([3, 3, 3, 9, 1, 1], 6) == [[0, 1], [2], [3], [4, 5]]
    assert _bins([10], 4) == [[0]]


# ---- the scheduler -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _seqs(prefix: list[int], own_lens: list[int], first_id: int) -> list[Sequence]:
    out = []
    for i, n in enumerate(own_lens):
        ids = prefix + [1000 + first_id + i] * n
        out.append(Sequence(first_id + i, first_id + i, ids, len(ids), 1))
    return out


def _drain(sched: PrefillScheduler) -> list[int]:
    """Run to completion, checking the pool after every step; returns the order in which members started."""
    started: list[int] = []
    while sched.has_unfinished():
        batch = sched.schedule()
        sched.check_integrity()
        for c in batch.chunks:
            if not c.seq.is_prefix and c.start == c.seq.num_shared_tokens:
                started.append(c.seq.seq_id)
        done = sched.on_step_done(batch)
        sched.check_integrity()
        for seq in done:
            assert seq.status is SequenceStatus.FINISHED and not seq.block_table  # own KV freed at once
    assert sched.pool.num_used == 0  # prefixes released after their last member
    return started


def test_shortest_prefill_first() -> None:
    sched = PrefillScheduler(64, 4, 8, clock=Clock())
    for i, n in enumerate([7, 3, 5, 1]):
        sched.add_group([], _seqs([], [n], i))
    started = _drain(sched)
    assert started == [3, 1, 2, 0]


def test_cache_hits_go_first_and_the_prefix_stays_pinned_while_members_remain() -> None:
    """A group whose prefix is resident finishes its members before a cold group with shorter ones starts."""
    sched = PrefillScheduler(64, 4, 12, clock=Clock())
    sched.add_group([9] * 16, _seqs([9] * 16, [6, 6, 6], 0))  # prefix 16 tokens
    sched.add_group([8] * 16, _seqs([8] * 16, [2, 2], 10))
    started = _drain(sched)
    # the cheapest start is group 1 (2 + 16 miss); once its prefix is resident its members (miss 2) and
    # then group 0's (prefix computed once) follow
    assert started == [10, 11, 0, 1, 2]
    assert sched.stats.prefix_computations == {0: 1, 1: 1}
    assert sched.stats.num_prompt_tokens_computed == 16 + 2 * 2 + 16 + 3 * 6


def test_starvation_guard_lets_a_long_wait_win() -> None:
    def order(lam: float) -> list[int]:
        clock = Clock()
        sched = PrefillScheduler(256, 4, 4, starvation_lambda=lam, clock=clock)
        sched.add_group([], _seqs([], [40], 0), arrival=0.0)  # long, arrived first
        clock.t = 5.0  # it has waited 5 s when the others arrive
        sched.add_group([], _seqs([], [4], 1), arrival=5.0)
        sched.add_group([], _seqs([], [12], 2), arrival=5.0)
        return _drain(sched)

    assert order(0.0) == [1, 2, 0]  # pure SPF
    assert order(6.0) == [1, 0, 2]  # cost 40 - 6 x 5 = 10 beats 12, not 4


def test_tight_pool_evicts_an_idle_prefix_and_computes_it_again() -> None:
    sched = PrefillScheduler(7, 4, 64, clock=Clock())  # 28 tokens of KV
    sched.add_group([7] * 8, _seqs([7] * 8, [4, 16], 0))  # prefix 2 blocks; members 1 and 4 own blocks
    sched.add_group([6] * 12, _seqs([6] * 12, [4, 16], 10))  # prefix 3 blocks; members 1 and 4 own blocks
    started = _drain(sched)
    # both prefixes resident, the short members run; then member 1 fits only once group 1's idle prefix
    # is evicted, which is computed again for member 11
    assert started == [0, 10, 1, 11]
    assert sched.stats.num_prefix_evictions == 1
    assert sched.stats.prefix_computations == {0: 1, 1: 2}
    assert sched.stats.peak_kv_blocks <= 7


def test_a_member_larger_than_the_pool_is_rejected() -> None:
    sched = PrefillScheduler(8, 4, 64, clock=Clock())
    sched.add_group([6] * 12, _seqs([6] * 12, [4, 30], 10))
    assert [s.seq_id for s in sched.rejected] == [11] and "needs 11 KV blocks" in sched.rejection_reasons[11]
    assert _drain(sched) == [10]
