"""The scheduler inside the real engine (default model, CPU): a KV pool too small for all
groups at once still computes every shared prefix exactly once, so the achieved
saving ratio equals the planned one."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import pytest

from batchllm.engine import engine as engine_module
from batchllm.engine.sampling import SamplingParams
from batchllm.engine.scheduler import Scheduler

BLOCK_SIZE = 16


@dataclass
class _AddedGroup:
    num_shared: int
    prompt_lens: list[int]
    max_tokens: list[int]

    def footprint(self) -> int:
        """Whole-group KV estimate in blocks: prefix + members x (suffix + max_tokens)."""
        shared = self.num_shared // BLOCK_SIZE
        own = sum(
            -(-(n + m - 1) // BLOCK_SIZE) - shared
            for n, m in zip(self.prompt_lens, self.max_tokens, strict=True)
        )
        return shared + own


class _RecordingScheduler(Scheduler):
    """The real scheduler, remembering what the engine handed it."""

    instances: ClassVar[list[_RecordingScheduler]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.added: list[_AddedGroup] = []
        _RecordingScheduler.instances.append(self)

    def add_group(self, prefix_token_ids, members):
        gid = super().add_group(prefix_token_ids, members)
        shared = members[0].num_shared_tokens
        self.added.append(
            _AddedGroup(shared, [m.num_prompt_tokens for m in members], [m.max_tokens for m in members])
        )
        return gid


def _workload(seed: int) -> list[list[int]]:
    """3 groups x 4 members sharing a 3-block prefix, plus 3 plain prompts; shuffled."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(3):
        prefix = [rng.randrange(1000, 40000) for _ in range(3 * BLOCK_SIZE + 5)]
        prompts += [prefix + [rng.randrange(1000, 40000) for _ in range(rng.randint(2, 9))] for _ in range(4)]
    prompts += [[rng.randrange(1000, 40000) for _ in range(rng.randint(10, 30))] for _ in range(3)]
    rng.shuffle(prompts)
    return prompts


@pytest.mark.slow
def test_small_pool_computes_each_prefix_once(default_model_path, monkeypatch) -> None:
    from batchllm.engine import Engine
    from batchllm.engine.config import ModelConfig

    cfg = ModelConfig.from_folder(default_model_path)
    block_bytes = 2 * cfg.num_layers * BLOCK_SIZE * cfg.num_kv_heads * cfg.head_dim * 4  # float32
    num_blocks = 9  # holds the largest group (about 7 blocks), not all groups (about 25)
    engine = Engine(
        default_model_path,
        device="cpu",
        block_size=BLOCK_SIZE,
        kv_cache_gb=(num_blocks + 0.5) * block_bytes / (1 << 30),
        max_num_batched_tokens=64,
    )
    assert engine.num_kv_blocks == num_blocks
    monkeypatch.setattr(engine_module, "Scheduler", _RecordingScheduler)
    _RecordingScheduler.instances.clear()
    max_tokens = 2
    prompts = _workload(seed=0)
    results = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))

    (sched,) = _RecordingScheduler.instances
    footprints = [g.footprint() for g in sched.added]
    assert max(footprints) <= num_blocks < sum(footprints), "the pool must hold one group but not all"
    shared_groups = [i for i, g in enumerate(sched.added) if g.num_shared]
    assert len(shared_groups) == 3
    assert sched.stats.prefix_computations == dict.fromkeys(shared_groups, 1), "a prefix was recomputed"

    stats = engine.stats
    assert all(r.ok and len(r.token_ids) == max_tokens for r in results)
    assert stats.preemptions == 0
    assert stats.prefixes_computed == 3 and stats.prefix_recomputations == 0
    assert 0 < stats.peak_kv_blocks <= num_blocks
    assert stats.max_tokens_per_step <= 64
    assert stats.planned_saving_ratio > 0.4
    assert stats.saving_ratio == pytest.approx(stats.planned_saving_ratio, abs=1e-12)
    physical = sum(g.num_shared + sum(n - g.num_shared for n in g.prompt_lens) for g in sched.added)
    assert stats.prompt_tokens_computed == physical
    # every member reads its group's prefix from the shared blocks
    assert sum(r.cached_tokens for r in results) == sum(
        g.num_shared * len(g.prompt_lens) for g in sched.added
    )


@pytest.mark.slow
def test_request_larger_than_pool_is_an_error_not_a_hang(default_model_path) -> None:
    from batchllm.engine import Engine
    from batchllm.engine.config import ModelConfig

    cfg = ModelConfig.from_folder(default_model_path)
    block_bytes = 2 * cfg.num_layers * BLOCK_SIZE * cfg.num_kv_heads * cfg.head_dim * 4
    engine = Engine(default_model_path, device="cpu", kv_cache_gb=4.5 * block_bytes / (1 << 30))
    assert engine.num_kv_blocks == 4
    rng = random.Random(1)
    big = [rng.randrange(1000, 40000) for _ in range(80)]  # 5 blocks before any output
    small = [rng.randrange(1000, 40000) for _ in range(20)]
    results = engine.generate([big, small], SamplingParams(max_tokens=3, ignore_eos=True))
    assert not results[0].ok and "KV blocks" in (results[0].error or "")
    assert results[1].ok and len(results[1].token_ids) == 3
