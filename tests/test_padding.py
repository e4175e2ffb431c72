"""Decode steps padded to the size whose GEMMs are measured cheapest (engine/padding.py)."""

from __future__ import annotations

import pytest
import torch

from batchllm.engine.graphs import CAPTURE_AT
from batchllm.engine.padding import cheapest_sizes, time_projections

# one Llama-3.1-8B layer's projections on an H200, ms (bench.gemm, bench/RESULTS.md)
H200 = {384: 0.256, 416: 0.306, 448: 0.451, 480: 0.364, 512: 0.338, 544: 0.386}


def test_each_size_runs_at_the_cheapest_size_that_holds_it() -> None:
    assert cheapest_sizes(list(H200), H200) == {384: 384, 416: 416, 448: 512, 480: 512, 512: 512, 544: 544}


def test_a_larger_size_must_be_clearly_cheaper() -> None:
    cost = {32: 1e-3, 64: 0.98e-3, 96: 0.5e-3}
    assert cheapest_sizes([32, 64, 96], cost) == {32: 96, 64: 96, 96: 96}
    assert cheapest_sizes([32, 64], cost) == {32: 32, 64: 64}  # 2% cheaper: within timing noise
    assert cheapest_sizes([32, 64, 96], {32: 1e-3}) == {32: 32, 64: 64, 96: 96}  # unmeasured: as they are
    tiny = {1: 5e-6, 64: 4e-6}  # 20% cheaper but 1 microsecond: a small model's noise
    assert cheapest_sizes([1, 64], tiny) == {1: 1, 64: 64}


@pytest.mark.gpu
def test_projection_timings_cover_every_size() -> None:
    linears = [torch.nn.Linear(256, 768, device="cuda"), torch.nn.Linear(768, 256, device="cuda")]
    cost = time_projections(linears, [1, 64, 512, 4096])
    assert set(cost) == {1, 64, 512, 4096} and all(0 < c < 1e-3 for c in cost.values())
    assert cost[4096] > cost[64]  # 64x the rows of a compute-bound product take longer


@pytest.mark.gpu
def test_padded_decode_steps_give_the_same_tokens(tmp_path) -> None:
    """Every step run at a larger size than it needs (the padding rows' outputs dropped; eagerly at a
    key's first steps, replayed after) gives the tokens of the eager engine, CUDA float32; the sizes
    are timed at the first decode step."""
    from batchllm.engine import Engine, SamplingParams
    from bench.gpu_check import build_model

    build_model(tmp_path)
    prompts = [[5 + i, 9, 11 + i % 7, 3 + 2 * i] * (1 + i % 3) for i in range(11)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    kv = {"kv_cache_tokens": 4096}  # not 90% of the GPU each: the first engine may not be collected yet
    eager = Engine(tmp_path, device="cuda", dtype="float32", cuda_graphs=False, **kv).generate(
        prompts, params
    )
    engine = Engine(tmp_path, device="cuda", dtype="float32", **kv)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.run_at is None  # nothing timed before a decode step
    assert [r.token_ids for r in engine.generate(prompts, params)] == [r.token_ids for r in eager]
    assert graphs.run_at is not None and set(graphs.cost) == set(graphs.sizes)
    # a key's first steps run eagerly on its buffers, its third captures the graph
    assert graphs.captured() == sorted(k for k, g in graphs.graphs.items() if g.steps >= CAPTURE_AT) != []
    sizes = graphs.sizes
    graphs.run_at = {s: sizes[min(i + 2, len(sizes) - 1)] for i, s in enumerate(sizes)}
    held = [g.hidden for g in graphs.graphs.values()]  # outputs of the old pool, still referenced
    graphs.reset()  # a fresh pool: the old one, its graphs gone but a tensor held, could take none
    padded = engine.generate(prompts, params)
    assert {key[0] for key in graphs.graphs} == {graphs.run_at[16]} == {64}  # 11 rows replayed as 64
    assert graphs.failed is None and graphs.captured() != [] and held
    assert [r.token_ids for r in padded] == [r.token_ids for r in eager]


@pytest.mark.gpu
def test_without_measured_padding_a_step_runs_at_the_smallest_size(tmp_path) -> None:
    from batchllm.engine import Engine, SamplingParams
    from bench.gpu_check import build_model

    build_model(tmp_path)
    engine = Engine(tmp_path, device="cuda", measured_padding=False)
    engine.generate([[5 + i, 6, 7] for i in range(11)], SamplingParams(max_tokens=4, ignore_eos=True))
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.cost == {} and all(s == t for s, t in graphs.run_at.items())
    assert {key[0] for key in graphs.graphs} == {16}


def test_measured_padding_is_checked_before_the_model_loads() -> None:
    from batchllm.engine import Engine

    with pytest.raises(ValueError, match="measured_padding: must be a bool"):
        Engine("no-such-model", measured_padding="yes")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_eager_steps_and_the_replay_of_a_key_are_identical(tmp_path) -> None:
    """The same decode step (bf16, two groups and a plain row, padded to 8 rows in 2 group slots) run
    eagerly twice on its key's buffers, then captured, then replayed: the same bits each time (the
    step rewrites the same keys and values, so it may run again)."""
    from batchllm.engine import Engine
    from batchllm.engine.runner import build_layout
    from batchllm.engine.sequence import ScheduledChunk, Sequence
    from bench.gpu_check import build_model

    build_model(tmp_path)
    engine = Engine(tmp_path, device="cuda", measured_padding=False)
    graphs = engine.runner.graphs
    assert graphs is not None
    graphs.run_at = {s: s for s in graphs.sizes}
    bs, chunks = engine.block_size, []
    for i in range(7):  # seven rows: one plain, then groups of three sharing two blocks (32 tokens)
        group = None if i == 0 else 1 + (i - 1) // 3
        prefix = [] if group is None else [2 * group, 2 * group + 1]
        n = 2 * bs + 3 + i
        seq = Sequence(i, i, list(range(10, 10 + n)), n, 4, block_table=[*prefix, 10 + 2 * i, 11 + 2 * i])
        if group is not None:
            seq.group_id, seq.num_shared_tokens = group, 2 * bs
        else:
            seq.block_table = [40, 41, 42]
        chunks.append(ScheduledChunk(seq, n - 1, 1, True))
    layout = build_layout(chunks, bs)
    assert layout.is_decode and layout.num_groups == 2
    ids = torch.arange(100, 107, device="cuda")
    outs = [graphs.run(layout, ids).clone() for _ in range(4)]
    assert graphs.captured() == [(8, 2, 16)] and graphs.graphs[8, 2, 16].steps == 4
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_measured_costs_are_kept_per_gpu_and_shapes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first engine measures; later ones read the costs back, unless the shapes, sizes or software
    differ or the entry is unreadable or short of a size; a cache that cannot be written costs nothing."""
    import json

    from batchllm.engine.padding import cached_costs

    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    linears = [torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)]
    calls: list[list[int]] = []

    def measure(sizes: list[int]):  # type: ignore[no-untyped-def]
        calls.append(sizes)
        return {s: 1e-3 / s for s in sizes}

    def costs() -> dict[int, float]:
        return cached_costs(linears, [1, 64], lambda: measure([1, 64]))

    first = costs()
    (entry,) = (tmp_path / "cache" / "padding").iterdir()
    assert costs() == first == {1: 1e-3, 64: 1e-3 / 64} and len(calls) == 1
    assert entry.stat().st_mode & 0o777 == 0o644  # a shared cache serves every user
    cached_costs(linears, [1, 64, 128], lambda: measure([1, 64, 128]))  # other sizes: measured
    cached_costs([torch.nn.Linear(8, 32)], [1, 64], lambda: measure([1, 64]))  # other shapes
    assert len(calls) == 3
    stored = json.loads(entry.read_text())
    for broken in (
        "{not json",
        json.dumps({**stored, "identity": {**stored["identity"], "torch": "0.0"}}),  # other software
        json.dumps({**stored, "costs": {"1": 1e-3}}),  # a size missing
    ):
        entry.write_text(broken)
        before = len(calls)
        assert costs() == first and len(calls) == before + 1  # measured again and rewritten
        assert costs() == first and len(calls) == before + 1
    assert not list((tmp_path / "cache" / "padding").glob("*.tmp"))
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(entry))  # a file where the folder would be
    assert costs() == first and len(calls) == 7
