"""Synthetic workloads of token ids for planner and engine benchmarks.

``templated_prompts`` imitates a warehouse batch job rendered through chat
templates: every prompt is

    chat header | system prompt | few-shot block | instruction | fields | row text | footer

- chat header/footer: a handful of tokens shared by every prompt.
- system prompt + instruction: one of ``templates`` templates (default 300),
  picked with Zipf-like popularity (a few jobs dominate, a long tail exists);
  system prompts are 40-160 tokens, instructions 10-40.
- few-shot block: each template has 1-4 variants of 0-120 tokens (some jobs use
  none), picked per row; that is where sharing nests below the template.
- fields: two low-cardinality columns per template (e.g. category, language:
  8 and 40 values of 2-8 tokens) rendered in a fixed order, which gives
  further, shallower sharing inside a template.
- row text: the per-row free text (20-180 tokens), unique per row.
- ``duplicates``: a fraction of rows repeat an earlier row exactly (re-runs,
  repeated questions).
max_tokens comes from the template (classification-like 1-8, extraction 16-64,
generation 128-512). Lengths average about 300 tokens. Everything is drawn
from one seeded generator, so a workload is reproducible from (n, seed).

``shared_prefix_workload`` is DESIGN section 7's W(P, S, D, sd, G): G groups
of sd members, shared prefix P, distinct suffix S, D output tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchllm.plan.tree import TokenTable, concat_ranges

_CHUNK_PROMPTS = 100_000  # prompts materialized per step; bounds the index temporaries


@dataclass(frozen=True)
class Workload:
    table: TokenTable
    max_tokens: np.ndarray
    description: str


class _Pool:
    """Token segments stored back to back; a segment is (start, length) into ``tokens``."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, tokens: np.ndarray) -> int:
        start = self.size
        self.parts.append(np.asarray(tokens, dtype=np.int32))
        self.size += len(tokens)
        return start

    def array(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int32)


def _zipf_choice(rng: np.random.Generator, k: int, n: int, s: float = 1.1) -> np.ndarray:
    weights = 1.0 / np.arange(1, k + 1) ** s
    perm = rng.permutation(k)  # popularity unrelated to template index
    return perm[rng.choice(k, size=n, p=weights / weights.sum())]


def templated_prompts(
    n: int,
    seed: int = 0,
    templates: int = 300,
    vocab: int = 49_152,
    duplicates: float = 0.01,
) -> Workload:
    rng = np.random.default_rng(seed)
    pool = _Pool()

    def seg(lo: int, hi: int) -> tuple[int, int]:
        length = int(rng.integers(lo, hi + 1))
        return pool.add(rng.integers(0, vocab, length)), length

    header = seg(4, 4)
    footer = seg(5, 5)
    sys_seg = np.array([seg(40, 160) for _ in range(templates)])
    instr_seg = np.array([seg(10, 40) for _ in range(templates)])
    n_shots = rng.integers(1, 5, templates)
    max_shots = int(n_shots.max())
    shot_seg = np.zeros((templates, max_shots, 2), dtype=np.int64)
    for t in range(templates):
        no_shots = rng.random() < 0.2
        for v in range(max_shots):
            shot_seg[t, v] = seg(0, 0) if no_shots else seg(30, 120)
    field_card = (8, 40)
    field_seg = [np.array([[seg(2, 8) for _ in range(c)] for _ in range(templates)]) for c in field_card]
    kind = rng.choice(3, size=templates, p=[0.4, 0.3, 0.3])
    mt_lo = np.array([1, 16, 128])[kind]
    mt_hi = np.array([8, 64, 512])[kind]
    text_pool_len = max(1 << 20, 4 * n)
    text_start = pool.add(rng.integers(0, vocab, text_pool_len))
    tokens_pool = pool.array()

    tpl = _zipf_choice(rng, templates, n)
    shot = rng.integers(0, n_shots[tpl])
    f = [rng.integers(0, c, n) for c in field_card]
    text_len = rng.integers(20, 181, n)
    text_off = text_start + rng.integers(0, text_pool_len - 180, n)
    max_tokens = rng.integers(mt_lo[tpl], mt_hi[tpl] + 1).astype(np.int64)
    if duplicates > 0 and n > 1:
        dup = np.flatnonzero(rng.random(n) < duplicates)
        dup = dup[dup > 0]
        src = (rng.random(dup.size) * dup).astype(np.int64)  # an earlier row
        # a duplicate repeats its source row as it ends up, itself perhaps a duplicate: resolved in order
        root = np.arange(n)
        for d, s in zip(dup.tolist(), src.tolist(), strict=True):
            root[d] = root[s]
        for arr in (tpl, shot, f[0], f[1], text_len, text_off, max_tokens):
            arr[:] = arr[root]

    slots = [
        (np.full(n, header[0]), np.full(n, header[1])),
        (sys_seg[tpl, 0], sys_seg[tpl, 1]),
        (shot_seg[tpl, shot, 0], shot_seg[tpl, shot, 1]),
        (instr_seg[tpl, 0], instr_seg[tpl, 1]),
        (field_seg[0][tpl, f[0], 0], field_seg[0][tpl, f[0], 1]),
        (field_seg[1][tpl, f[1], 0], field_seg[1][tpl, f[1], 1]),
        (text_off, text_len),
        (np.full(n, footer[0]), np.full(n, footer[1])),
    ]
    starts = np.stack([s for s, _ in slots], axis=1).astype(np.int64)
    lens = np.stack([ln for _, ln in slots], axis=1).astype(np.int64)
    table = _materialize(tokens_pool, starts, lens)
    desc = f"templated: {n} prompts, {templates} templates, seed {seed}, ~{duplicates:.0%} duplicates"
    return Workload(table, max_tokens, desc)


def _materialize(pool: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> TokenTable:
    """Prompt i = concatenation of pool segments (starts[i, k], lens[i, k]) over k."""
    n = starts.shape[0]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens.sum(axis=1), out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.int32)
    for lo in range(0, n, _CHUNK_PROMPTS):
        hi = min(n, lo + _CHUNK_PROMPTS)
        idx = concat_ranges(starts[lo:hi].reshape(-1), lens[lo:hi].reshape(-1))
        values[offsets[lo] : offsets[hi]] = pool[idx]
    return TokenTable(values, offsets)


def shared_prefix_workload(
    prefix: int, suffix: int, decode: int, members: int, groups: int, seed: int = 0, vocab: int = 32_000
) -> Workload:
    """W(P, S, D, sd, G) from DESIGN 7: G groups of sd members, prefix P, suffix S, D output tokens."""
    rng = np.random.default_rng(seed)
    pre = rng.integers(0, vocab, (groups, prefix), dtype=np.int32)
    suf = rng.integers(0, vocab, (groups, members, suffix), dtype=np.int32)
    rows = np.concatenate((np.repeat(pre[:, None, :], members, axis=1), suf), axis=2)
    n = groups * members
    offsets = np.arange(n + 1, dtype=np.int64) * (prefix + suffix)
    desc = f"W(P={prefix}, S={suffix}, D={decode}, sd={members}, G={groups})"
    return Workload(TokenTable(rows.reshape(-1), offsets), np.full(n, decode, dtype=np.int64), desc)
