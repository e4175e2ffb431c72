"""Hybrid prefill: classify prompts longer than the whole KV pool, with the same probabilities.

An engine whose pool holds 64 tokens scores prompts of 70-400 tokens layer by
layer over the idle pool's memory; the session engine (a 0.5 GB pool) scores
them the paged way. Both within 1e-4, for single- and multi-token labels, next
to prompts that do fit (paged in the same run).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchllm.engine import Engine
from batchllm.engine.hybrid import HybridPrefill, plain_len
from batchllm.engine.labels import LabelSet
from batchllm.engine.packing import build_unit

LABELS = {
    "single": ["positive", "negative", "neutral"],
    "multi": ["not employed", "employed", "part-time employed"],
}
REVIEW = "The plot was thin but the acting carried it, and the last scene stayed with me for days. "


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    tok = engine.tokenizer

    def chat(text: str) -> list[int]:
        return tok.encode(
            tok.apply_chat_template([{"role": "user", "content": "Label this review.\n" + text}])
        )

    return [chat(REVIEW * n) for n in (1, 6, 2, 14)] + [chat("Great."), chat("Awful.")]


@pytest.fixture(scope="module")
def small(default_model_path) -> Engine:
    return Engine(default_model_path, kv_cache_tokens=64, max_num_batched_tokens=48)


@pytest.mark.parametrize("name", list(LABELS))
@pytest.mark.parametrize("pack", [False, True])
def test_longer_than_the_pool_scores_like_the_paged_path(
    engine, small, prompts, name: str, pack: bool
) -> None:
    labels = LABELS[name]
    want = engine.classify(prompts, labels, pack=False)
    got = small.classify(prompts, labels, pack=pack)
    long = sum(len(p) > 64 for p in prompts)
    if pack:  # long items share packs (the tree mask inside hybrid prefill)
        assert small.stats.hybrid_units >= 1 and small.stats.packs >= 1
    else:
        assert long >= 3 and small.stats.hybrid_units >= long  # (label nodes may push one more over)
        assert small.stats.steps > 0  # the short ones ran paged
    for w, g in zip(want, got, strict=True):
        assert g.ok, g.error
        assert [g.probs[x] for x in labels] == pytest.approx([w.probs[x] for x in labels], abs=1e-4)
    if not pack:  # a hybrid unit computes its whole prompt (a pack computes the shared trunk once)
        long_tokens = sum(len(p) for p in prompts if len(p) > 64)
        assert long_tokens <= small.stats.prompt_tokens_computed <= sum(map(len, prompts))


def test_without_hybrid_prefill_a_long_prompt_gets_an_error_and_the_rest_run(
    default_model_path, prompts
) -> None:
    off = Engine(default_model_path, kv_cache_tokens=64, hybrid_prefill=False)
    results = off.classify(prompts, LABELS["single"], pack=False)
    for p, r in zip(prompts, results, strict=True):
        assert r.ok == (len(p) <= 64)
        if not r.ok:
            assert "the pool has 4" in r.error and "hybrid_prefill is off" in r.error


def test_a_prompt_too_long_even_for_hybrid_prefill_gets_an_error(default_model_path, prompts) -> None:
    tiny = Engine(default_model_path, kv_cache_tokens=16)
    room = HybridPrefill(tiny.model, tiny.attention, tiny.runner.kv_cache, 16, 48).capacity()
    nodes = LabelSet.build(LABELS["multi"], tiny.tokenizer).num_nodes
    results = tiny.classify(prompts, LABELS["multi"], pack=False)
    for p, r in zip(prompts, results, strict=True):
        assert r.ok == (len(p) + nodes <= room), (len(p), room, r.error)
        if not r.ok:
            assert "too long for hybrid prefill" in r.error
    ok = [len(p) for p, r in zip(prompts, results, strict=True) if r.ok]
    assert ok and len(ok) < len(prompts)
    # the rows that did not fit computed nothing: neither their prompt nor their label positions
    assert tiny.stats.label_tokens_computed == nodes * len(ok)
    assert tiny.stats.prompt_tokens_computed == sum(ok) and tiny.stats.hybrid_units == len(ok)


def test_the_same_memory_holds_a_much_longer_sequence(small) -> None:
    """SmolLM2 in float32: the pool keeps 30 layers x 2 x 192 values per token, hybrid prefill
    2 x 576 (hidden, residual) + one layer's 2 x 192."""
    tokens = small.num_kv_blocks * small.block_size
    room = HybridPrefill(small.model, small.attention, small.runner.kv_cache, 16, 48).capacity()
    assert room >= 6 * tokens


def test_plain_len_is_the_causal_part_of_a_unit(small) -> None:
    labels = LabelSet.build(LABELS["multi"], small.tokenizer)
    unit = build_unit(np.arange(32), [(0, np.arange(100, 110))], labels)
    assert plain_len(unit) >= 42 and plain_len(unit) < unit.num_tokens
    assert (
        plain_len(
            build_unit(np.arange(32), [(0, np.arange(100, 110))], LabelSet.build(["a"], small.tokenizer))
        )
        == 42
    )


@pytest.mark.parametrize(
    ("device", "dtype", "tol"),
    [
        ("cpu", "float32", 1e-4),
        pytest.param("cuda", "float32", 1e-4, marks=pytest.mark.gpu),
        # bf16: the two paths' tiles run in different orders (0.097 apart on an H100); a wrong cast or
        # mask moves the log-probs by nats
        pytest.param("cuda", "bfloat16", 0.25, marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("name", list(LABELS))
def test_triton_backend_hybrid_equals_paged(tmp_path, device: str, dtype: str, tol: float, name: str) -> None:
    """The Triton kernels over the one-layer cache (interpreted on CPU): a small random model with
    attention that matters (weights of std 0.25: 0.02 makes it near uniform), prompts longer than a
    48-token pool, against the same engine's paged path with a large pool. Log-probabilities are
    compared: three-token labels have tiny probabilities, where an absolute tolerance sees nothing.
    In bf16 this sharp model's log-probs move ~0.5 from float32's, and two paths that differ only in
    tile order ~0.1 (H100: 0.097 here, 1e-5 in float32): float32 checks the logic on CUDA too."""
    from bench.gpu_check import build_model

    folder = tmp_path / "model"
    # enough layers for one layer's KV to be the smaller part
    build_model(folder, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4)
    # multi: a branching trie (a and b share their first token, then part), so the last chunk takes
    # the tree mask (the second branch must not see the first)
    tokens = [[10, 11, 13], [10, 12, 13], [11, 12, 13]] if name == "multi" else [[10], [11], [12]]
    labels = LabelSet.from_token_ids(["a", "b", "c"], tokens)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 512, n).tolist() for n in (20, 60, 100)]
    kw = dict(device=device, attention="triton", max_num_batched_tokens=32, dtype=dtype)
    want = Engine(folder, kv_cache_tokens=1024, **kw).classify(prompts, labels, pack=False)
    small = Engine(folder, kv_cache_tokens=48, **kw)
    got = small.classify(prompts, labels, pack=False)
    assert small.stats.hybrid_units == 2
    for w, g in zip(want, got, strict=True):
        assert g.ok, g.error
        assert min(w.probs.values()) > 1e-12  # no label's probability underflows: its log is compared
        assert [math.log(g.probs[x]) for x in "abc"] == pytest.approx(
            [math.log(w.probs[x]) for x in "abc"], abs=tol
        )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from bench.generate import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "m", num_hidden_layers=8)


def test_long_items_pack_only_as_far_as_hybrid_prefill_holds(tiny_folder) -> None:
    """Items longer than the pool pack among themselves for hybrid prefill, never beyond what it holds:
    five 116-token items each fit, and packed together (up to pack_tokens) they would not."""
    e = Engine(tiny_folder, load_format="dummy", seed=0, kv_cache_tokens=64, max_num_batched_tokens=64)
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 512, 16).tolist()
    prompts = [prefix + rng.integers(3, 512, 100).tolist() for _ in range(5)]
    labels = LabelSet.from_token_ids(["a", "b"], [[5], [6]])
    alone = e.classify(prompts, labels, pack=False)
    packed = e.classify(prompts, labels, pack=True)
    assert all(r.ok for r in alone) and all(r.ok for r in packed), [r.error for r in packed]
    for a, p in zip(alone, packed, strict=True):
        assert [p.probs[x] for x in "ab"] == pytest.approx([a.probs[x] for x in "ab"], abs=1e-5)


def test_hybrid_prefill_leaves_the_pool_clean(tiny_folder) -> None:
    """Hidden states and residuals left in the borrowed pool read as bf16 KV hold NaN/inf patterns:
    the next call must score and generate as a fresh engine does."""
    from batchllm.engine import SamplingParams

    def make() -> Engine:
        kw = {"load_format": "dummy", "seed": 0, "kv_cache_tokens": 64, "max_num_batched_tokens": 64}
        return Engine(tiny_folder, dtype="bfloat16", **kw)

    rng = np.random.default_rng(1)
    long = [rng.integers(3, 512, 150).tolist() for _ in range(3)]
    pre = rng.integers(3, 512, 16).tolist()
    short = [pre + rng.integers(3, 512, n).tolist() for n in (3, 9, 17)]
    labels = LabelSet.from_token_ids(["a", "b", "c"], [[5, 9], [6, 7, 2], [6, 8]])
    fresh = make()
    want = ([r.probs for r in fresh.classify(short, labels, pack=True)],
            [r.token_ids for r in fresh.generate(short, SamplingParams(max_tokens=8))])  # fmt: skip
    used = make()
    used.classify(long, labels, pack=False)
    assert used.stats.hybrid_units == 3
    assert bool(used.runner.kv_cache.isfinite().all())
    got = ([r.probs for r in used.classify(short, labels, pack=True)],
           [r.token_ids for r in used.generate(short, SamplingParams(max_tokens=8))])  # fmt: skip
    assert got == want


def test_label_token_ids_outside_the_vocabulary_are_refused(tiny_folder) -> None:
    e = Engine(tiny_folder, load_format="dummy", seed=0, kv_cache_tokens=64)
    with pytest.raises(ValueError, match=r"labels: 'b' hold token ids outside the vocabulary \(512\)"):
        e.classify([[5, 6, 7]], LabelSet.from_token_ids(["a", "b"], [[5], [600, 6]]))
    with pytest.raises(ValueError, match="token ids must be >= 0"):
        LabelSet.from_token_ids(["a", "b"], [[5], [-1]])
