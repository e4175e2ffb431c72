"""What the vLLM backend submits, worked out without vLLM: plan order, priorities, label requests.

Kept apart from ``backends/vllm.py`` so that CI, which has no vLLM, tests it.

vLLM reuses a prefix only while its KV blocks are still cached, so the order
requests reach its waiting queue decides its prefix-cache hits. The job's
plan already orders the prompts group by group (each group's shared prefix
computed once); submitting in that order, with the group's rank as its
priority, hands vLLM the same schedule the native engine runs.

Classification needs the probability of whole label token sequences without
``prompt_logprobs`` (vLLM computes those without reading its prefix cache):
each proper prefix of a label (a trie node of ``LabelSet``) becomes one more
request, prompt + that prefix, ``max_tokens=1``, asking for the log-probability
of the tokens that may follow it. Requests of one prompt share the prompt as a
prefix, so vLLM's cache serves all but their last few tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from batchllm.engine.labels import LabelSet

GroupSpec = tuple[int, Sequence[int]]


def submission_order(n: int, groups: Sequence[GroupSpec] | None) -> tuple[list[int], list[int]]:
    """Positions 0..n-1 in plan order and each one's priority (its group's rank; lower runs first).

    A position the plan does not name (no plan, or a prompt outside every group)
    comes after the planned ones, with a priority after theirs. A position named
    twice keeps its first group.
    """
    order: list[int] = []
    priority: list[int] = []
    seen: set[int] = set()
    for rank, (_, members) in enumerate(groups or ()):
        for m in members:
            m = int(m)
            if not 0 <= m < n:
                raise ValueError(f"groups: position {m} is outside the shard's {n} prompts")
            if m not in seen:
                seen.add(m)
                order.append(m)
                priority.append(rank)
    last = len(groups or ())
    for m in range(n):
        if m not in seen:
            order.append(m)
            priority.append(last)
    return order, priority


def label_readers(labels: LabelSet) -> list[tuple[tuple[int, ...], list[int]]]:
    """Per reader of ``labels`` (0: the prompt's end, k: trie node k - 1): the tokens fed after the
    prompt, and the token ids whose log-probability that position must give."""
    prefixes = sorted({ids[:i] for ids in labels.token_ids for i in range(1, len(ids))})
    if len(prefixes) != labels.num_nodes or any(
        p[-1] != t for p, t in zip(prefixes, labels.node_tokens.tolist(), strict=True)
    ):
        raise ValueError("labels: the label trie is not in the order this backend expects")
    readers: list[tuple[tuple[int, ...], list[int]]] = [((), [])] + [(p, []) for p in prefixes]
    for reader, token in zip(labels.term_reader.tolist(), labels.term_token.tolist(), strict=True):
        wanted = readers[reader][1]
        if token not in wanted:
            wanted.append(token)
    return readers


def label_probs(labels: LabelSet, logprobs: Sequence[Mapping[int, float]]) -> dict[str, float]:
    """Softmax over the labels of their summed token log-probabilities (one mapping per reader)."""
    acc = np.zeros(labels.num_labels, dtype=np.float64)
    for label, reader, token in zip(
        labels.term_label.tolist(), labels.term_reader.tolist(), labels.term_token.tolist(), strict=True
    ):
        acc[label] += logprobs[reader][token]
    acc -= acc.max()
    p = np.exp(acc)
    p /= p.sum()
    return {name: float(v) for name, v in zip(labels.labels, p, strict=True)}


def prompt_error(
    tokens: np.ndarray, max_model_len: int, vocab_size: int, label_tokens: int = 0
) -> str | None:
    """Why vLLM would refuse a prompt (it refuses the whole batch for one), or None. label_tokens: a
    label request feeds up to that many label tokens after the prompt (classify, score)."""
    if tokens.size == 0:
        return "prompt: empty prompt (0 tokens)"
    if label_tokens and tokens.size + label_tokens >= max_model_len:
        return (
            f"prompt: {tokens.size} tokens plus {label_tokens} label tokens is longer than "
            f"max_model_len={max_model_len} allows"
        )
    if tokens.size >= max_model_len:
        return f"prompt: {tokens.size} tokens leaves no room to generate within max_model_len={max_model_len}"
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        return f"prompt: token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})"
    return None
