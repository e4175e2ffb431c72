"""Label-restricted classification against transformers' full logits (default model)."""

from __future__ import annotations

import pytest
import torch

LABELS = ["positive", "negative", "neutral"]
REVIEWS = [
    "I loved this movie, it was great!",
    "Terrible service, never again.",
    "It was okay I guess.",
    "Best purchase ever.",
    "The battery died after two days.",
    "Nothing special, nothing bad.",
]
INSTRUCTION = (
    "Classify the sentiment of the review as positive, negative or neutral. Answer with one word.\nReview: "
)


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    tok = engine.tokenizer
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": INSTRUCTION + r}])) for r in REVIEWS
    ]


def test_probs_match_transformers(engine, hf_model, prompts) -> None:
    results = engine.classify(prompts, LABELS)
    label_ids = [engine.tokenizer.encode(label)[0] for label in LABELS]
    with torch.inference_mode():
        for prompt, r in zip(prompts, results, strict=True):
            logits = hf_model(torch.tensor([prompt])).logits[0, -1, label_ids]
            expected = torch.softmax(logits, dim=-1).tolist()
            assert r.status == "ok" and r.error is None
            assert [r.probs[label] for label in LABELS] == pytest.approx(expected, abs=1e-5)
            assert r.label == LABELS[max(range(3), key=lambda j: expected[j])]
            assert r.prompt_tokens == len(prompt)
    assert [r.index for r in results] == list(range(len(prompts)))
    assert engine.stats.output_tokens == 0 and engine.stats.decode_steps == 0  # one forward, no token
    assert {r.label for r in results} == set(LABELS)  # the model gets these easy cases right


def test_shared_instruction_is_computed_once(engine, prompts) -> None:
    shared = engine.classify([*prompts, prompts[0]], LABELS)
    stats = engine.stats
    plain = engine.classify([*prompts, prompts[0]], LABELS, enable_sharing=False)
    assert stats.prompt_tokens_computed < engine.stats.prompt_tokens_computed
    assert stats.saving_ratio > 0.3 and engine.stats.saving_ratio == 0.0
    for a, b in zip(shared, plain, strict=True):
        assert a.label == b.label
        for label in LABELS:
            assert a.probs[label] == pytest.approx(b.probs[label], abs=1e-5)
    assert shared[-1].cached_tokens == shared[-1].prompt_tokens  # the duplicate was answered once


def test_labels_may_share_first_tokens(engine, hf_model, prompts) -> None:
    """Whole-label scoring: 'yes' and 'yes please' start alike and still get their own probabilities,
    each label's the product of its tokens' probabilities (transformers' full logits), normalized."""
    labels = ["yes", "yes please", "no"]
    ids = [engine.tokenizer.encode(label) for label in labels]
    assert ids[1][: len(ids[0])] == ids[0] and len(ids[1]) > len(ids[0])
    results = engine.classify(prompts[:2], labels)
    with torch.inference_mode():
        for prompt, r in zip(prompts[:2], results, strict=True):
            scores = []
            for label in ids:
                logp = torch.log_softmax(hf_model(torch.tensor([prompt + label])).logits[0].double(), -1)
                scores.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(label)))
            expected = torch.softmax(torch.tensor(scores), 0).tolist()
            assert r.ok and [r.probs[label] for label in labels] == pytest.approx(expected, abs=1e-5)
            assert r.probs["yes"] > r.probs["yes please"]
    assert engine.stats.label_tokens_computed == 2  # the node "yes" after each prompt


@pytest.mark.parametrize(
    ("labels", "message"),
    [([], "labels: give a non-empty list"), (["a", "a"], "'a' is given twice"), (["a", ""], "non-empty str")],
)
def test_bad_label_sets_are_refused(engine, prompts, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        engine.classify(prompts[:1], labels)


def test_bad_prompt_gets_an_error_result(engine, prompts) -> None:
    results = engine.classify([prompts[0], [], prompts[1]], LABELS)
    assert results[1].status == "error" and "empty" in results[1].error
    assert results[0].status == results[2].status == "ok"


@pytest.mark.parametrize("hybrid", [False, True])
def test_packed_units_fit_the_kv_pool(tmp_path, hybrid: bool) -> None:
    """Packing fills a unit with a group's members only as far as the KV pool holds it: members that
    fit one by one never fail (or go to hybrid prefill) because they were packed together."""
    import random

    from batchllm.engine import Engine
    from batchllm.engine.labels import LabelSet
    from bench.generate import write_tiny_model

    rng = random.Random(0)
    prefix = [rng.randrange(3, 512) for _ in range(32)]
    prompts = [prefix + [rng.randrange(3, 512) for _ in range(100)] for _ in range(10)]
    labels = LabelSet.from_token_ids(["a", "b"], [[5], [6]])
    folder = write_tiny_model(tmp_path / "tiny")
    engine = Engine(folder, load_format="dummy", kv_cache_tokens=512, hybrid_prefill=hybrid, seed=0)
    plain = engine.classify(prompts, labels, pack=False)
    packed = engine.classify(prompts, labels, pack=True)
    assert all(r.error is None for r in packed), packed[0].error
    assert engine.stats.hybrid_units == 0
    for a, b in zip(plain, packed, strict=True):
        assert a.label == b.label and a.probs == pytest.approx(b.probs, abs=1e-5)
