"""Whole-label classification and scoring against a full-vocabulary transformers reference (float32, CPU).

The reference feeds prompt + label tokens to the HF model, sums the
log-softmax over the whole vocabulary of each label token, and normalizes
over the labels. The engine must give the same probabilities within 1e-4
for single-token, multi-token and shared-first-token label sets, packed or
not, shared prefix or not.
"""

from __future__ import annotations

import pytest
import torch

INSTRUCTION = (
    "You read short reviews of products and services and label how the customer felt about them. "
    "Answer with the label only.\nReview: "
)
REVIEWS = [
    "I loved this movie, it was great!",
    "Terrible service, never again.",
    "It was okay I guess.",
    "The battery died after two days.",
    "Best purchase ever.",
]
LABEL_SETS = {
    "single": ["positive", "negative", "neutral"],  # one distinct token each: the cheap path
    "multi": ["not employed", "employed", "retired", "part-time employed"],  # 2-4 tokens
    "shared-first": ["very good", "very bad", "okay", "The good"],  # "very ..." share their first token
}


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    tok = engine.tokenizer
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": INSTRUCTION + r}])) for r in REVIEWS
    ]


def reference(hf_model, tokenizer, prompt: list[int], labels: list[str]) -> list[float]:
    """P(label | prompt) over the labels from full-vocabulary log-probabilities of every label token."""
    scores = []
    with torch.inference_mode():
        for label in labels:
            ids = tokenizer.encode(label)
            logits = hf_model(torch.tensor([prompt + ids])).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(ids) - 1], dim=-1)
            scores.append(float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum()))
    return torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()


@pytest.fixture(scope="module")
def expected(hf_model, engine, prompts) -> dict[str, list[list[float]]]:
    return {
        name: [reference(hf_model, engine.tokenizer, p, labels) for p in prompts]
        for name, labels in LABEL_SETS.items()
    }


@pytest.mark.parametrize("name", list(LABEL_SETS))
@pytest.mark.parametrize("mode", ["packed", "members", "plain"])
def test_probs_equal_the_full_vocabulary_reference(engine, prompts, expected, name: str, mode: str) -> None:
    labels = LABEL_SETS[name]
    options = {"packed": {"pack": True}, "members": {"pack": False}, "plain": {"enable_sharing": False}}
    results = engine.classify(prompts, labels, **options[mode])
    for r, want in zip(results, expected[name], strict=True):
        assert r.ok, r.error
        assert [r.probs[label] for label in labels] == pytest.approx(want, abs=1e-4)
        assert r.label == labels[max(range(len(labels)), key=lambda j: want[j])]
    stats = engine.stats
    assert stats.output_tokens == 0 and stats.decode_steps == 0
    if mode == "packed":
        assert stats.packs >= 1 and stats.packed_items == len(prompts)
    if mode != "plain":
        assert stats.saving_ratio > 0.3  # the instruction is computed once
    nodes = {"single": 0, "multi": 2, "shared-first": 3}[name]  # "not", "re", "part","part-","part-time"...
    assert (stats.label_tokens_computed > 0) == (nodes > 0)


def test_score_is_yes_over_yes_plus_no(engine, hf_model, prompts) -> None:
    results = engine.score(prompts, yes="Yes", no="No")
    for r, p in zip(results, prompts, strict=True):
        want = reference(hf_model, engine.tokenizer, p, ["Yes", "No"])
        assert r.score == pytest.approx(want[0], abs=1e-4)
        assert r.score == pytest.approx(r.probs["Yes"]) and r.probs["No"] == pytest.approx(want[1], abs=1e-4)


def test_chunks_split_packs_items_and_label_nodes(default_model_path, prompts, expected) -> None:
    """A 7-token step budget and 4-token blocks cut packs mid-item and mid-label-tree: same probabilities."""
    from batchllm.engine import Engine

    small = Engine(default_model_path, device="cpu", kv_cache_gb=0.1, block_size=4, max_num_batched_tokens=7)
    for name in ("multi", "shared-first"):
        labels = LABEL_SETS[name]
        results = small.classify(prompts, labels, pack=True, pack_tokens=40)
        assert small.stats.packs >= 2 and small.stats.steps >= 20  # 7 tokens a step
        for r, want in zip(results, expected[name], strict=True):
            assert [r.probs[label] for label in labels] == pytest.approx(want, abs=1e-4)


def test_label_positions_must_fit_the_context(default_model_path) -> None:
    """A prompt that fits max_model_len but leaves no room for its label tokens is an error result only."""
    from batchllm.engine import Engine

    small = Engine(default_model_path, device="cpu", kv_cache_gb=0.05, max_model_len=40)
    labels = LABEL_SETS["multi"]  # "part-time employed": 4 tokens, 3 positions past the prompt
    prompts = [list(range(100, 139)), list(range(100, 137)), list(range(100, 141)), []]
    results = small.classify(prompts, labels)
    assert [r.ok for r in results] == [False, True, False, False]
    assert "39 tokens plus 3 label tokens is longer than max_model_len=40" in results[0].error
    assert "longer than max_model_len" in results[2].error and "empty" in results[3].error
    assert small.classify(prompts[:1], ["yes", "no"])[0].ok  # single-token labels need no extra position


def test_triton_backend_scores_like_the_reference(tmp_path) -> None:
    """The prefill-only path on the GPU backend (Triton kernels, interpreted on CPU): grouped members,
    single-token labels (the cheap path), and packed candidates (the tree mask) score as the reference."""
    pytest.importorskip("triton")
    from batchllm.engine import Engine
    from batchllm.engine.labels import LabelSet
    from bench.gpu_check import build_model, workload

    build_model(tmp_path)
    prompts = workload(2, 3, 32, 512)
    labels = LabelSet.from_token_ids(["a", "b", "c"], [[5], [6], [7]])
    probs: dict[tuple[str, bool], list[list[float]]] = {}
    for attention in ("torch", "triton"):
        engine = Engine(tmp_path, attention=attention, kv_cache_tokens=2048)
        for pack in (False, True):
            results = engine.classify(prompts, labels, pack=pack)
            probs[attention, pack] = [list(r.probs.values()) for r in results]
            assert engine.stats.saving_ratio > 0.4
    for pack in (False, True):
        for got, want in zip(probs["triton", pack], probs["torch", pack], strict=True):
            assert got == pytest.approx(want, abs=1e-4)


def test_packing_by_default_follows_the_backend(engine, prompts, monkeypatch) -> None:
    """pack=None packs where the backend says packs are its fast path (cpu: yes; fa3: members run faster)."""
    backend = engine.runner.attention
    assert backend.packs_by_default
    engine.classify(prompts, ["Yes", "No"])
    assert engine.stats.packs >= 1
    monkeypatch.setattr(backend, "packs_by_default", False)
    engine.classify(prompts, ["Yes", "No"])
    assert engine.stats.packs == 0 and engine.stats.saving_ratio > 0.3
