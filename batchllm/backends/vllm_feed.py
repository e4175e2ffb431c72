"""Feeding a plan to vLLM's engine loop so each group's members find their prefix already cached.

vLLM caches a prefix's KV blocks only once a request has computed them: members
of one group admitted in the same step all compute the shared prefix. So a
group's first request (its leader) goes first; the rest of the group is added
once the leader has produced its first token (its prompt, the shared prefix
included, is cached by then). Groups open in plan order while the KV demand of
the open groups fits the cache, so a group's prefix is not evicted before its
members read it; requests carry their group's rank as priority where the
engine schedules by priority. Written against the small surface
``add_request(id, prompt, params[, priority])``, ``step()`` and
``has_unfinished_requests()`` that vLLM's ``LLMEngine`` has had across
versions; tested with a fake engine (no vLLM needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def group_demand(lengths: Sequence[int], new_tokens: Sequence[int], prefix_len: int) -> int:
    """KV tokens a group's requests hold at once when its shared prefix is stored once."""
    total = sum(n + d for n, d in zip(lengths, new_tokens, strict=True))
    return max(total - max(len(lengths) - 1, 0) * prefix_len, max(lengths, default=0))


def feed(
    engine: Any,
    prompts: Sequence[list[int]],
    params: Sequence[Any],
    units: Sequence[Sequence[int]],
    demand: Sequence[int],
    capacity: int,
    priority: bool,
) -> list[Any]:
    """Run every request of ``units`` (groups of request indices, plan order) through ``engine``;
    the finished outputs by request index."""
    results: list[Any] = [None] * len(prompts)
    unit_of = {i: u for u, unit in enumerate(units) for i in unit}
    if len(unit_of) != len(prompts):
        raise ValueError("feed: every request must be in exactly one unit")
    by_id: dict[str, int] = {}
    waiting_leader: dict[int, int] = {}  # leader request -> its unit, until its first token
    left: dict[int, int] = {}  # open unit -> requests not finished
    used = opened = done = 0

    def add(i: int) -> None:
        extra = {"priority": unit_of[i]} if priority else {}
        rid = engine.add_request(str(i), {"prompt_token_ids": list(prompts[i])}, params[i], **extra)
        by_id[str(i)] = i  # outputs carry the id given (some versions return an internal one)
        if isinstance(rid, str):
            by_id[rid] = i

    while done < len(prompts):
        while opened < len(units) and (not left or used + demand[opened] <= capacity):
            unit = units[opened]
            left[opened] = len(unit)
            used += demand[opened]
            waiting_leader[unit[0]] = opened
            add(unit[0])
            opened += 1
        if not engine.has_unfinished_requests():
            raise RuntimeError("vllm: the engine has no requests left but some results are missing")
        for out in engine.step():
            i = by_id[out.request_id]
            u = waiting_leader.pop(i, None)
            if u is not None:
                for j in units[u][1:]:
                    add(j)
            if out.finished:
                results[i] = out
                done += 1
                v = unit_of[i]
                left[v] -= 1
                if not left[v]:
                    del left[v]
                    used -= demand[v]
    return results
