"""The prefill-only run (DESIGN 4.3): classify and score without decode or sampling.

``run_prefill`` turns a prepared ``Batch`` into units (``packing``: a group's
shared prefix, then its members one by one or packed, each followed by the
label nodes multi-token labels need), hands them to the ``PrefillScheduler``
(shortest cache-miss prefill first, starvation guard) and drives the steps:
forward -> the hidden states at every read position of the step's chunks ->
label log-probabilities (``scoring.LabelScorer``). A unit ends in the step
that computes its last chunk; its KV is freed there, only group prefixes stay
(pinned while their members run). A unit longer than the whole KV pool runs
after the others through hybrid prefill (``hybrid``), over the idle pool's memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as SequenceLike
from typing import TYPE_CHECKING

import numpy as np
import torch

from batchllm.engine.collect import fewer_collections
from batchllm.engine.hybrid import HybridPrefill
from batchllm.engine.labels import LabelSet
from batchllm.engine.outputs import ClassifyResult, EngineStats
from batchllm.engine.packing import Unit, plan_units
from batchllm.engine.prefill_scheduler import PrefillScheduler
from batchllm.engine.requests import Batch, Progress
from batchllm.engine.scoring import LabelScorer
from batchllm.engine.sequence import ScheduledChunk
from batchllm.engine.sequence import Sequence as Seq

if TYPE_CHECKING:
    from batchllm.engine.engine import Engine

PACK_TOKENS = 2048  # item tokens per pack (label nodes included)


@fewer_collections()
def run_prefill(
    engine: Engine,
    batch: Batch,
    labels: LabelSet,
    *,
    pack: bool | None,
    pack_tokens: int,
    progress: Progress | None,
    t0: float,
) -> tuple[list[ClassifyResult], EngineStats]:
    """Score every request of the batch against the labels; results in input order, and the run's stats."""
    if isinstance(pack_tokens, bool) or not isinstance(pack_tokens, int) or pack_tokens < 1:
        raise ValueError(f"pack_tokens: must be an integer >= 1, got {pack_tokens!r}")
    vocab = engine.model.cfg.vocab_size
    if bad := [
        label for label, ids in zip(labels.labels, labels.token_ids, strict=True) if max(ids) >= vocab
    ]:
        raise ValueError(
            f"labels: {', '.join(map(repr, bad))} hold token ids outside the vocabulary ({vocab})"
        )
    clock, total = time.perf_counter, batch.num_inputs
    stats = EngineStats(num_requests=total, num_kv_blocks=engine.num_kv_blocks)
    stats.prompt_tokens_logical, stats.num_groups = batch.logical_tokens, len(batch.groups)
    trees = engine.runner.attention.supports_tree_mask
    pack = engine.runner.attention.packs_by_default if pack is None else pack
    if (pack or labels.num_nodes) and not trees:
        what = "packing" if pack else f"multi-token labels ({', '.join(map(repr, labels.labels))})"
        raise ValueError(f"attention: {what} needs a backend with a tree mask; {engine.attention!r} has none")
    _check_label_room(batch, labels, engine.max_model_len)
    scheduler = PrefillScheduler(
        engine.num_kv_blocks,
        engine.block_size,
        engine.max_num_batched_tokens,
        starvation_lambda=engine.starvation_lambda,
    )
    hybrid = _hybrid(engine) if engine.hybrid_prefill else None
    units, first_item, oversized = _submit(
        scheduler, batch, labels, pack, pack_tokens, engine.block_size, hybrid
    )
    items = [k for u in units.values() for k in u.requests]
    scorer = LabelScorer(labels, len(items), engine.runner.device)
    stats.plan_s = clock() - t0
    num_done = total - sum(len(r.inputs) for r in batch.requests if r.error is None)
    if progress is not None and num_done:
        progress(num_done, total)
    while scheduler.has_unfinished():
        t_host = clock()
        step = scheduler.schedule()
        rows, item_ids, readers = _reads(step.chunks, units, first_item)
        t_run = clock()
        hidden = engine.runner.forward(step.chunks, rows)
        scorer.add(engine.model, hidden, item_ids, readers)
        t_out = clock()
        if done := scheduler.on_step_done(step):
            now = clock() - t0
            for seq in done:
                for k in units[seq.seq_id].requests:
                    batch.requests[k].latency_s = now
                    num_done += len(batch.requests[k].inputs)
            if progress is not None:
                progress(num_done, total)
        stats.add_step(len(step.chunks), 0, t_out - t_run, t_run - t_host + clock() - t_out)
    stats.add_run(scheduler.stats, 0, batch.planned_physical)
    failed: set[int] = set()  # hybrid units that did not fit: computed nothing
    if oversized:
        t_run = clock()
        assert hybrid is not None
        failed = _run_hybrid(
            engine,
            hybrid,
            batch,
            {i: units[i] for i in oversized},
            first_item,
            scorer,
            stats,
            t0,
        )
        stats.prefill_s += clock() - t_run
    if progress is not None and num_done < total:
        progress(total, total)
    for k, p in zip(items, scorer.probs().tolist(), strict=True):
        batch.requests[k].probs = p
    ran = [u for i, u in units.items() if i not in failed]
    multi = [u for u in ran if len(u.requests) > 1]
    stats.add_prefill(sum(u.num_label_tokens for u in ran), len(multi), sum(len(u.requests) for u in multi))
    stats.wall_s = clock() - t0
    results = classify_results(batch, labels.labels)
    stats.num_errors = sum(r.error is not None for r in results)
    return results, stats


def _check_label_room(batch: Batch, labels: LabelSet, max_model_len: int) -> None:
    """A request whose label positions would pass max_model_len gets an error (it cannot be scored)."""
    if not labels.max_depth:
        return
    for req in batch.requests:
        if req.error is None and req.tokens.size + labels.max_depth > max_model_len:
            req.error = (
                f"prompt: {req.tokens.size} tokens plus {labels.max_depth} label tokens is longer "
                f"than max_model_len={max_model_len}"
            )


def _hybrid(engine: Engine) -> HybridPrefill:
    return HybridPrefill(
        engine.model,
        engine.attention,
        engine.runner.kv_cache,
        engine.block_size,
        engine.max_num_batched_tokens,
    )


def _run_hybrid(
    engine: Engine,
    runner: HybridPrefill,
    batch: Batch,
    units: dict[int, Unit],
    first_item: dict[int, int],
    scorer: LabelScorer,
    stats: EngineStats,
    t0: float,
) -> set[int]:
    """Units longer than the KV pool, one at a time through hybrid prefill over the idle pool's memory;
    one that does not fit even so gets an error and the rest of the run stands. Returns those."""
    failed = set()
    for seq_id, unit in units.items():
        try:
            hidden = runner.forward(unit)
        except (MemoryError, RuntimeError) as e:  # CPU allocators raise RuntimeError, CUDA its subclass
            if not isinstance(e, MemoryError | torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            for k in unit.requests:
                batch.requests[k].error = f"prompt: too long for hybrid prefill ({e})"
            failed.add(seq_id)
            continue
        scorer.add(engine.model, hidden, first_item[seq_id] + unit.read_item, unit.read_reader)
        stats.tokens_computed += unit.num_tokens
        stats.prompt_tokens_computed += unit.num_tokens
        stats.hybrid_units += 1
        for k in unit.requests:
            batch.requests[k].cached_tokens = 0
            batch.requests[k].latency_s = time.perf_counter() - t0
    return failed


def _submit(
    scheduler: PrefillScheduler,
    batch: Batch,
    labels: LabelSet,
    pack: bool,
    pack_tokens: int,
    block_size: int,
    hybrid: HybridPrefill | None,
) -> tuple[dict[int, Unit], dict[int, int], list[int]]:
    """One Sequence per unit, group by group; returns units by seq_id, each unit's first item index
    and the units longer than the whole KV pool (for hybrid prefill; without it they get an error)."""
    units: dict[int, Unit] = {}
    pool_tokens = scheduler.pool.num_blocks * block_size
    for trunk, group in plan_units(
        batch,
        labels,
        pack=pack,
        pack_tokens=pack_tokens,
        block_size=block_size,
        max_unit_tokens=pool_tokens,
        max_hybrid_tokens=None if hybrid is None else hybrid.capacity(),
    ):
        seqs = []
        for u in group:
            seq = Seq(
                seq_id=len(units),
                request_index=u.requests[0],
                token_ids=u.token_ids,  # an array: never appended (Sequence.token_ids)
                num_prompt_tokens=u.num_tokens,
                max_tokens=1,
                rope_positions=u.rope,
                key_ends=u.key_ends,
            )
            units[seq.seq_id] = u
            seqs.append(seq)
        scheduler.add_group(trunk, seqs)
        for seq in seqs:
            for k in units[seq.seq_id].requests:
                batch.requests[k].cached_tokens = seq.num_shared_tokens
    oversized = [seq.seq_id for seq in scheduler.rejected]
    if hybrid is None:
        for seq_id in oversized:
            reason = f"prompt: {scheduler.rejection_reasons[seq_id]} (hybrid_prefill is off)"
            for k in units.pop(seq_id).requests:
                batch.requests[k].error = reason
        oversized = []
    first_item, num_items = {}, 0
    for seq_id, u in units.items():
        first_item[seq_id] = num_items
        num_items += len(u.requests)
    return units, first_item, oversized


def _reads(
    chunks: SequenceLike[ScheduledChunk], units: dict[int, Unit], first_item: dict[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rows of the step to read, with the (global) item and reader of each."""
    rows, items, readers = [], [], []
    offset = 0
    for c in chunks:
        u = units.get(c.seq.seq_id)  # group prefixes (negative ids) read nothing
        if u is not None:
            lo, hi = np.searchsorted(u.reads, [c.start, c.end])
            rows.append(offset + u.reads[lo:hi] - c.start)
            items.append(first_item[c.seq.seq_id] + u.read_item[lo:hi])
            readers.append(u.read_reader[lo:hi])
        offset += c.num_tokens
    if not rows:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return np.concatenate(rows), np.concatenate(items), np.concatenate(readers)


def classify_results(batch: Batch, labels: SequenceLike[str]) -> list[ClassifyResult]:
    """One result per input: the most likely label and every label's probability (or the error)."""
    results = [ClassifyResult(index=i, prompt_tokens=len(t)) for i, t in enumerate(batch.tokens)]
    for i, e in batch.errors.items():
        results[i].error, results[i].status = e, "error"
    for req in batch.requests:
        for n, i in enumerate(req.inputs):
            r = results[i]
            r.latency_s = req.latency_s
            if req.error is not None:
                r.error, r.status = req.error, "error"
                continue
            best = max(range(len(labels)), key=lambda j: req.probs[j])
            r.label, r.probs = labels[best], dict(zip(labels, req.probs, strict=True))
            r.cached_tokens = req.cached_tokens if n == 0 else r.prompt_tokens
    return results
