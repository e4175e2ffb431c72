"""Request preparation, torch-free: prompts -> token arrays -> validated, deduplicated requests in groups.

The engine calls ``tokenize``, ``params_list`` and ``check_prompt`` on its
inputs, then ``prepare`` turns them into a ``Batch``: the unique requests and
their grouping by shared prefix, in execution order. Grouping comes from one of
three places:

- sharing off: every valid input is a plain request, in input order (groups
  given are ignored);
- ``groups`` given (a job's plan, see ``groups_from_plan``): run as given, no
  dedup here (render deduplicated the job's prompts already);
- otherwise the planner (``batchllm.plan.build_plan``) groups the prompts and
  finds exact duplicates (its ``duplicate_of``): the one token-level dedup.
  The engine only adds the rule of when a duplicate may share an answer:
  identical deterministic params (greedy, or an explicit seed).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from batchllm.engine.admission import shared_prefix_len

if TYPE_CHECKING:
    from batchllm.engine.sequence import Sequence

Prompt = str | SequenceLike[int] | np.ndarray
Progress = Callable[[int, int], None]
GroupSpec = tuple[int, SequenceLike[int]]  # (prefix_len, input indices), one group of a precomputed plan

SEED_MASK = (1 << 63) - 1


class Params(Protocol):
    """What preparation reads of ``SamplingParams`` (defined with the sampler, which needs torch)."""

    max_tokens: int
    seed: int | None

    @property
    def is_greedy(self) -> bool: ...


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: SequenceLike[str]) -> list[np.ndarray]: ...
    def decode(self, ids: SequenceLike[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class Request:
    """One unique (prompt, params) to run, and the inputs that receive its answer."""

    tokens: np.ndarray
    params: Any  # SamplingParams
    inputs: list[int]
    seed: int
    seq: Sequence | None = None
    first_token_s: float = 0.0
    finish_reason: str = "length"
    stop_text: str | None = None  # output text cut before a stop string
    cached_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None  # the scheduler rejected it (it can never fit)
    probs: list[float] = field(default_factory=list)


@dataclass
class Batch:
    """The requests of one call, grouped: ``groups`` holds (prefix_len, request indices) in execution order."""

    tokens: list[np.ndarray]  # per input
    errors: dict[int, str]  # input index -> why it does not run
    requests: list[Request]
    groups: list[tuple[int, list[int]]]
    planned_physical: int | None = None  # prompt tokens the grouping computes (None: sharing off)

    @property
    def num_inputs(self) -> int:
        return len(self.tokens)

    @property
    def logical_tokens(self) -> int:
        """Prompt tokens of the inputs that run, duplicates counted."""
        return sum(int(r.tokens.size) * len(r.inputs) for r in self.requests)


# ---- inputs -------------------------------------------------------------------------


def tokenize(prompts: Prompt | SequenceLike[Prompt], tokenizer: Callable[[], Encoder]) -> list[np.ndarray]:
    """Token id arrays of a prompt or a batch (texts, id lists, 1-D arrays, or a 2-D array of rows).

    ``tokenizer`` is called only when there is text to encode, so token-id
    prompts run on models without a tokenizer.
    """
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    elif isinstance(prompts, str | np.ndarray) or (
        isinstance(prompts, SequenceLike) and prompts and isinstance(prompts[0], int | np.integer)
    ):
        prompts = [prompts]  # type: ignore[list-item]
    out: list[np.ndarray] = []
    texts: dict[int, str] = {}  # position -> text prompt, encoded in one batch below
    for p in prompts:  # type: ignore[union-attr]
        if isinstance(p, str):
            texts[len(out)] = p
            out.append(np.empty(0, dtype=np.int64))
            continue
        arr = np.asarray(p)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"prompts: each prompt must be a str or a 1-D sequence of token ids, got {p!r}")
        out.append(arr.astype(np.int64))
    if texts:
        encoded = tokenizer().encode_batch(list(texts.values()))
        for i, ids in zip(texts, encoded, strict=True):
            out[i] = ids.astype(np.int64)
    return out


def params_list(params: Any, n: int, kind: type) -> list[Any]:
    """One ``kind`` (SamplingParams) per prompt: None = defaults, one instance = the same for all."""
    if params is None:
        return [kind()] * n
    if isinstance(params, kind):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"params: got {len(params)} SamplingParams for {n} prompts")
    for p in params:
        if not isinstance(p, kind):
            raise ValueError(f"params: expected SamplingParams, got {type(p).__name__}")
    return params


def check_prompt(tokens: np.ndarray, max_model_len: int, vocab_size: int) -> str | None:
    """Why a prompt cannot run (it then gets an error result), or None."""
    if tokens.size == 0:
        return "prompt: empty prompt (0 tokens)"
    if tokens.size > max_model_len:
        return f"prompt: {tokens.size} tokens is longer than max_model_len={max_model_len}"
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        return f"prompt: token id {bad} is outside the vocabulary [0, {vocab_size})"
    return None


# ---- grouping -----------------------------------------------------------------------


def prepare(
    tokens: list[np.ndarray],
    params: list[Any],
    errors: dict[int, str],
    *,
    sharing: bool,
    block_size: int,
    rng: random.Random,
    groups: Iterable[GroupSpec] | None = None,
) -> Batch:
    """Requests and their groups (see the module docstring for where the grouping comes from)."""
    valid = [i for i in range(len(tokens)) if i not in errors]
    # one draw per valid input, in input order, whatever the grouping (unseeded sampling stays repeatable)
    seeds = {
        i: (params[i].seed if params[i].seed is not None else rng.getrandbits(63)) & SEED_MASK for i in valid
    }
    if not sharing or not valid:
        requests = [Request(tokens[i], params[i], [i], seeds[i]) for i in valid]
        return Batch(tokens, errors, requests, [(0, [k]) for k in range(len(requests))])
    if groups is not None:
        classes = _given_groups(tokens, errors, groups, block_size)
        covered = {i for _, members in classes for inputs in members for i in inputs}
        classes += [(0, [[i]]) for i in valid if i not in covered]
    else:
        classes = _planned_groups(tokens, params, valid, block_size)
    batch = Batch(tokens, errors, [], [])
    for prefix_len, members in classes:
        first = len(batch.requests)
        for inputs in members:
            i = inputs[0]
            batch.requests.append(Request(tokens[i], params[i], inputs, seeds[i]))
        batch.groups.append((prefix_len, list(range(first, len(batch.requests)))))
    batch.planned_physical = _physical_tokens(batch, block_size)
    return batch


def _planned_groups(
    tokens: list[np.ndarray], params: list[Any], valid: list[int], block_size: int
) -> list[tuple[int, list[list[int]]]]:
    """The planner's groups over the valid inputs; each member is the list of inputs one request answers.

    Inputs the planner found identical share one request when their params are
    equal and deterministic; other copies run as extra members next to it (and
    an otherwise plain prompt with copies becomes a group sharing the prompt).
    """
    from batchllm.plan import build_plan

    plan = build_plan(
        [tokens[i].astype(np.int32) for i in valid],
        np.array([params[i].max_tokens for i in valid], dtype=np.int64),
        block_size,
        dedup=True,
    )
    copies: dict[int, list[list[int]]] = {}  # representative (plan index) -> inputs per request
    for k, i in enumerate(valid):
        reqs = copies.setdefault(int(plan.duplicate_of[k]), [])
        p = params[i]
        same = None
        if p.is_greedy or p.seed is not None:
            same = next((r for r in reqs if params[r[0]] == p), None)
        if same is not None:
            same.append(i)
        else:
            reqs.append([i])
    out: list[tuple[int, list[list[int]]]] = []
    offsets = plan.member_offsets
    for g in range(plan.num_groups):
        members = [r for rep in plan.members[offsets[g] : offsets[g + 1]].tolist() for r in copies[rep]]
        prefix_len = int(plan.prefix_len[g])
        if prefix_len == 0 and len(members) > 1:  # copies of one prompt that must run apart share it
            prefix_len = int(tokens[members[0][0]].size)
        out.append((prefix_len, members))
    return out


def _given_groups(
    tokens: list[np.ndarray], errors: dict[int, str], groups: Iterable[GroupSpec], block_size: int
) -> list[tuple[int, list[list[int]]]]:
    """Validate a precomputed grouping and run it as given.

    Rule for a prefix_len that is not a multiple of this engine's block_size:
    it is rounded down to whole blocks (a partial block is never shared), so
    the members still share a valid, shorter prefix. Inputs with an error
    result are skipped; inputs in no group run afterwards as plain requests.
    """
    n = len(tokens)
    seen: set[int] = set()
    out: list[tuple[int, list[list[int]]]] = []
    for entry in groups:
        try:
            prefix_len, members = entry
            members = [int(m) for m in members]
        except (TypeError, ValueError):
            raise ValueError(
                f"groups: each group must be (prefix_len, [input indices]), got {entry!r}"
            ) from None
        if not isinstance(prefix_len, int | np.integer) or prefix_len < 0:
            raise ValueError(f"groups: prefix_len must be an integer >= 0, got {prefix_len!r}")
        for m in members:
            if not 0 <= m < n:
                raise ValueError(f"groups: input index {m} is out of range for {n} prompts")
            if m in seen:
                raise ValueError(f"groups: input {m} appears in more than one group")
            seen.add(m)
        members = [m for m in members if m not in errors]
        if not members:
            continue
        prefix = int(prefix_len) // block_size * block_size
        ref = tokens[members[0]][:prefix]
        for m in members:
            if tokens[m].size < prefix or not np.array_equal(tokens[m][:prefix], ref):
                raise ValueError(f"groups: input {m} does not start with its group's {prefix}-token prefix")
        out.append((prefix, [[m] for m in members]))
    return out


def _physical_tokens(batch: Batch, block_size: int) -> int:
    """Prompt tokens the grouping computes: each group's shared prefix once, then every request's rest."""
    total = 0
    for prefix_len, members in batch.groups:
        lens = [int(batch.requests[k].tokens.size) for k in members]
        shared = shared_prefix_len(prefix_len, lens, block_size)
        total += shared + sum(n - shared for n in lens)
    return total


def groups_from_plan(plan: Any, inputs: SequenceLike[int]) -> list[tuple[int, list[int]]]:
    """A plan's (or a plan shard's) groups as positions into ``inputs``, the shard's prompt list.

    ``inputs`` holds global input indices of the plan (what the shard runs, in
    any order). An input that duplicates a member (the plan's ``duplicate_of``)
    joins its member's group; groups with no input in ``inputs`` are dropped.
    """
    pos = {int(g): k for k, g in enumerate(inputs)}
    copies: dict[int, list[int]] = {}
    dup = plan.duplicate_of
    for g, k in pos.items():
        rep = int(dup[g])
        if rep != g:
            copies.setdefault(rep, []).append(k)
    out: list[tuple[int, list[int]]] = []
    offsets = plan.member_offsets
    lengths = plan.table.lengths
    for j in range(plan.num_groups):
        members: list[int] = []
        prefix_len = int(plan.prefix_len[j])
        for m in plan.members[offsets[j] : offsets[j + 1]].tolist():
            extra = copies.get(m, [])
            if m in pos:
                members.append(pos[m])
            members += extra
            if extra and prefix_len == 0:
                prefix_len = int(lengths[m])  # copies of a plain prompt share it (cut to whole blocks)
        if members:
            out.append((prefix_len, members))
    return out
