"""Greedy parity of the engine with HF transformers on the real default model (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from batchllm.engine import SamplingParams
from batchllm.engine.runner import ModelRunner
from batchllm.engine.sequence import ScheduledChunk, Sequence

TOPICS = [
    "the water cycle",
    "photosynthesis",
    "black holes",
    "the French revolution",
    "binary search",
    "compound interest",
    "volcanoes",
    "the immune system",
    "prime numbers",
    "machine learning",
]
ASKS = [
    "Explain {} to a ten year old.",
    "Give me three facts about {}.",
    "Write a short poem about {}.",
    "What is the most common misconception about {}?",
    "Summarize {} in one sentence.",
]
LONG_TEXT = (
    "The committee met on Tuesday to review the quarterly budget. Revenue grew by four percent, "
    "mostly from the new subscription plans, while support costs rose because of the larger customer "
    "base. The team proposed hiring two engineers, moving the data warehouse to a cheaper storage tier, "
    "and pausing the marketing campaign in regions where it did not pay off. "
)
PAD = EOS = 2

pytestmark = pytest.mark.slow  # minutes on a 2-core CPU (the transformers reference, big batches)


def chat_prompts(tokenizer) -> list[list[int]]:
    """50 chat prompts: short questions, multi-turn chats and long documents to summarize."""
    messages = []
    for i, topic in enumerate(TOPICS):
        for j, ask in enumerate(ASKS[:4]):
            messages.append([{"role": "user", "content": ask.format(topic)}])
            if (i + j) % 7 == 0:
                messages[-1] = [
                    {"role": "system", "content": "You answer briefly and precisely."},
                    {"role": "user", "content": f"Tell me about {topic}."},
                    {"role": "assistant", "content": f"Sure, {topic} is a broad subject."},
                    {"role": "user", "content": ask.format(topic)},
                ]
    for k in range(10):
        doc = LONG_TEXT * (1 + k % 4) + f"Item {k}: the meeting ended at {k + 3} pm."
        messages.append([{"role": "user", "content": f"Summarize this report:\n{doc}"}])
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(m)) for m in messages]
    assert len(prompts) == 50
    return prompts


def max_tokens_for(i: int) -> int:
    return 16 + (i * 5) % 9  # 16..24


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    return chat_prompts(engine.tokenizer)


@pytest.fixture(scope="module")
def batched(engine, prompts):
    params = [SamplingParams(max_tokens=max_tokens_for(i)) for i in range(len(prompts))]
    return engine.generate(prompts, params)


@pytest.fixture(scope="module")
def reference(hf_model, prompts) -> dict[int, tuple[list[int], torch.Tensor]]:
    """transformers greedy ``generate`` per prompt: (new tokens, logits of the first generated position).

    Prompts run in left-padded batches of similar length (and equal max_tokens),
    which keeps the reference affordable on a CPU.
    """
    out: dict[int, tuple[list[int], torch.Tensor]] = {}
    order = sorted(range(len(prompts)), key=lambda i: (max_tokens_for(i), len(prompts[i])))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < 8 and max_tokens_for(batches[-1][0]) == max_tokens_for(i):
            batches[-1].append(i)
        else:
            batches.append([i])
    with torch.inference_mode():
        for batch in batches:
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), PAD, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            gen = hf_model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens_for(batch[0]),
                do_sample=False,
                pad_token_id=PAD,
                output_logits=True,
                return_dict_in_generate=True,
            )
            for row, i in enumerate(batch):
                new = gen.sequences[row, width:].tolist()
                if EOS in new:  # generate pads a finished row; the answer ends at its first EOS
                    new = new[: new.index(EOS) + 1]
                out[i] = (new, gen.logits[0][row].float())
    return out


def test_prompts_are_varied(prompts) -> None:
    lengths = sorted(len(p) for p in prompts)
    assert lengths[0] < 40 and lengths[-1] > 250


def test_greedy_tokens_match_transformers(prompts, batched, reference) -> None:
    mismatches = []
    for i, result in enumerate(batched):
        assert result.error is None and result.index == i
        if reference[i][0] != result.token_ids:
            mismatches.append((i, reference[i][0], result.token_ids))
    assert not mismatches, f"{len(mismatches)} prompts differ from transformers, first: {mismatches[0]}"
    finish = {r.finish_reason for r in batched}
    assert finish <= {"stop", "length"} and "length" in finish


def _chunk(seq: Sequence, start: int, num_tokens: int, sample: bool = True) -> ScheduledChunk:
    return ScheduledChunk(seq, start, num_tokens, sample)


def test_first_position_logits_match_transformers(engine, prompts, reference) -> None:
    """Logits at the last prompt position of ten prompts run as one varlen batch through the paged runner."""
    runner: ModelRunner = engine.runner
    bs = engine.block_size
    picks = list(range(0, len(prompts), 5))
    chunks, next_block = [], 0
    for i in picks:
        n = -(-len(prompts[i]) // bs)
        blocks = list(range(next_block, next_block + n))[::-1]  # free blocks, in any order
        next_block += n
        seq = Sequence(10_000 + i, i, list(prompts[i]), len(prompts[i]), 1, block_table=blocks)
        chunks.append(_chunk(seq, 0, len(prompts[i])))
    logits = runner.model.compute_logits(runner.forward(chunks))
    worst = 0.0
    for chunk, row in zip(chunks, logits, strict=True):
        ref = reference[chunk.seq.request_index][1]
        worst = max(worst, (row - ref).abs().max().item())
    assert worst < 1e-4, f"max abs logit difference {worst:.2e}"


def test_one_at_a_time_equals_batch(engine, prompts, batched) -> None:
    for i in [0, 13, 31, 45, 49]:
        alone = engine.generate(
            [prompts[i]], SamplingParams(max_tokens=max_tokens_for(i)), enable_sharing=False
        )
        assert alone[0].token_ids == batched[i].token_ids, f"prompt {i}"
        assert alone[0].text == batched[i].text


def test_results_carry_text_and_timing(engine, batched) -> None:
    for r in batched:
        assert r.text == engine.tokenizer.decode(r.token_ids)
        assert 0 < r.first_token_s <= r.latency_s
        assert r.prompt_tokens > 0
