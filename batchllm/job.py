"""The steps of one batch job, engine-free except ``infer_shard``; the Prefect flow calls them in order.

extract -> prepare (render, skip done rows, dedup, tokenize) -> plan (prefix
groups, shards) -> infer_shard (one backend per shard) -> stage -> load ->
report. ``batchllm plan`` runs the first three only: no weights are loaded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchllm import render, warehouse
from batchllm.backends.base import Outcome, Progress, create_backend, resolve_device, supports
from batchllm.spec import JobSpec, SpecError, validate_columns

_listeners: list[Progress] = []


@contextmanager
def progress_listener(callback: Progress) -> Iterator[None]:
    """Receive (done, total) inference progress of every shard while the block runs (e.g. a terminal bar)."""
    _listeners.append(callback)
    try:
        yield
    finally:
        _listeners.remove(callback)


def notify_progress(done: int, total: int) -> None:
    for callback in list(_listeners):
        callback(done, total)


@dataclass
class Prepared:
    """Rows of this run, rendered and tokenized, with the counts of rows not run again."""

    run_id: str
    started_at: datetime
    model_folder: str
    prompts: render.Prompts
    rows_total: int
    rows_skipped: int
    rows_recovered: int
    model_context: int | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class PlanInfo:
    """Shards of distinct-prompt indices (plan order) and the planner's statistics."""

    shards: list[list[int]]
    stats: dict[str, Any]


def check(spec: JobSpec) -> None:
    """Checks that need code but no data or weights: the backend can run the task kind."""
    reason = supports(spec.backend, spec.task.kind)
    if reason:
        raise SpecError(reason)


def validate(spec: JobSpec) -> None:
    """Everything checkable before a run starts: task support, the query's columns, the model folder."""
    check(spec)
    validate_columns(spec, warehouse.describe(spec))
    check_labels(spec, tokenizer_for(spec)[0])


def check_labels(spec: JobSpec, tokenizer: Any) -> None:
    """Labels are scored by their first token (as a reply starts), so first tokens must differ."""
    first: dict[int, str] = {}
    for label in spec.task.labels or []:
        ids = tokenizer.encode(label)
        if not ids:
            raise SpecError(f"task.labels: {label!r} encodes to no token")
        if ids[0] in first:
            raise SpecError(
                f"task.labels: {first[ids[0]]!r} and {label!r} start with the same token "
                f"{tokenizer.decode(ids[:1])!r}; use labels whose first tokens differ"
            )
        first[ids[0]] = label


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def decode_budget(spec: JobSpec) -> int:
    """Output tokens per prompt the plan and cost estimate count on (classify and score decode nothing)."""
    return spec.sampling.max_tokens if spec.task.kind == "generate" else 0


@cache
def _tokenizer(folder: Path) -> Any:
    """One parse of a model's tokenizer.json per process (validation and prepare both need it)."""
    from batchllm.engine.tokenizer import Tokenizer

    return Tokenizer(folder)


def tokenizer_for(spec: JobSpec) -> tuple[Any, Path]:
    """The model's tokenizer (no weights); model errors become spec errors naming ``model``."""
    from batchllm.models import ModelError, resolve_model

    try:
        folder = resolve_model(spec.model)
        return _tokenizer(folder), folder
    except (ModelError, ValueError) as exc:
        message = str(exc)
        raise SpecError(message if message.startswith("model") else f"model: {message}") from None


def prepare(spec: JobSpec, table: pa.Table, run_id: str | None = None, dry_run: bool = False) -> Prepared:
    """Render rows, drop those with a result already (incremental) or staged by an interrupted run, tokenize.

    Staged rows of an interrupted run whose prompt changed since are deleted first,
    unless ``dry_run`` (which writes nothing).
    """
    started_at = warehouse.now()
    t0 = time.perf_counter()
    tokenizer, folder = tokenizer_for(spec)
    check_labels(spec, tokenizer)
    rows = render.render_rows(spec, table, tokenizer)
    t1 = time.perf_counter()
    if not dry_run:
        warehouse.prune_staging(spec, rows)
    recovered_keys = warehouse.done_keys(spec, include_results=False)
    rows, recovered = render.drop_done(rows, recovered_keys)
    skipped = 0
    if spec.incremental:  # staged rows were dropped just above: only the results table is left to check
        done = warehouse.done_keys(spec, include_results=True, include_staging=False)
        rows, skipped = render.drop_done(rows, done)
    t2 = time.perf_counter()
    context = render.context_len(folder)
    prompts = render.tokenize(rows, tokenizer, render.prompt_limit(spec, context))
    t3 = time.perf_counter()
    return Prepared(
        run_id=run_id or new_run_id(),
        started_at=started_at,
        model_folder=str(folder),
        prompts=prompts,
        rows_total=table.num_rows,
        rows_skipped=skipped,
        rows_recovered=recovered,
        model_context=context,
        timings={"render_s": t1 - t0, "skip_s": t2 - t1, "tokenize_s": t3 - t2},
    )


def plan(spec: JobSpec, prepared: Prepared) -> PlanInfo:
    """Group the distinct prompts by shared prefix and cut whole groups into ``spec.shards`` shards."""
    from batchllm.plan import build_plan, shard_plan

    token_ids = prepared.prompts.token_ids
    if not token_ids:
        return PlanInfo(shards=[], stats={"logical_tokens": 0, "physical_tokens": 0, "saving_ratio": 0.0})
    built = build_plan(token_ids, decode_budget(spec), block_size=spec.block_size)
    parts = shard_plan(built, spec.shards) if spec.shards > 1 else [built]
    shards = [_shard_inputs(part) for part in parts]
    return PlanInfo(shards=[s for s in shards if s], stats=dict(built.stats.to_dict()))


def _shard_inputs(part: Any) -> list[int]:
    """A shard's prompts in execution order: group members first, then any exact duplicates."""
    members = part.members.tolist()
    seen = set(members)
    extra = [int(i) for i in part.inputs() if int(i) not in seen]
    return members + extra


def infer_shard(
    spec: JobSpec, token_ids: list[np.ndarray], progress: Progress | None = None
) -> tuple[list[Outcome], dict[str, Any]]:
    """Load the model on the job's device and run one shard. Returns outcomes (input order) and engine stats."""
    t0 = time.perf_counter()
    backend = create_backend(spec.backend, spec.model, spec.device)
    t1 = time.perf_counter()
    try:
        outcomes = backend.run(token_ids, spec.task, spec.sampling, progress=progress)
        stats = backend.stats()
    finally:
        backend.close()
    stats["load_s"] = t1 - t0
    stats["run_s"] = time.perf_counter() - t1
    return outcomes, stats


def device_name(spec: JobSpec) -> str:
    return resolve_device(spec.device)


def result_rows(spec: JobSpec, prepared: Prepared, indices: list[int], outcomes: list[Outcome]) -> pa.Table:
    """Result rows (results schema) of every row whose prompt is among ``indices``; duplicates fan out."""
    if len(indices) != len(outcomes):
        raise RuntimeError(f"backend returned {len(outcomes)} outcomes for {len(indices)} prompts")
    by_prompt = dict(zip(indices, outcomes, strict=True))
    row_prompt = prepared.prompts.row_prompt
    positions = [i for i, j in enumerate(row_prompt) if j >= 0 and int(j) in by_prompt]
    picked = [by_prompt[int(row_prompt[i])] for i in positions]
    return _rows(spec, prepared, positions, picked)


def error_rows(spec: JobSpec, prepared: Prepared) -> pa.Table:
    """Result rows for rows that failed before inference (render errors, too long)."""
    positions = [i for i, j in enumerate(prepared.prompts.row_prompt) if j < 0]
    errors = prepared.prompts.rows.column("error").to_pylist()
    picked = [Outcome(prompt_tokens=0, finish_reason="error", error=errors[i]) for i in positions]
    return _rows(spec, prepared, positions, picked)


def _rows(spec: JobSpec, prepared: Prepared, positions: list[int], outcomes: list[Outcome]) -> pa.Table:
    rows = prepared.prompts.rows.take(pa.array(positions, pa.int64()))
    n = len(positions)
    schema = warehouse.results_schema(rows.schema.field("id").type)
    lens = prepared.prompts.lengths
    prompt_tokens = [
        int(lens[prepared.prompts.row_prompt[i]]) if prepared.prompts.row_prompt[i] >= 0 else o.prompt_tokens
        for i, o in zip(positions, outcomes, strict=True)
    ]
    status = [warehouse.STATUS_ERROR if o.error else warehouse.STATUS_OK for o in outcomes]
    columns: dict[str, Any] = {
        "id": rows.column("id"),
        "prompt_hash": rows.column("prompt_hash"),
        "model": [spec.model] * n,
        "params_hash": [spec.params_hash] * n,
        "task": [spec.task.kind] * n,
        "output": [o.output for o in outcomes],
        "label": [o.label for o in outcomes],
        "score": [o.score for o in outcomes],
        "label_probs": [None if o.label_probs is None else list(o.label_probs.items()) for o in outcomes],
        "prompt_tokens": prompt_tokens,
        "output_tokens": [o.output_tokens for o in outcomes],
        "cached_tokens": [o.cached_tokens for o in outcomes],
        "finish_reason": [o.finish_reason for o in outcomes],
        "status": status,
        "error": [o.error for o in outcomes],
        "run_id": [prepared.run_id] * n,
        "created_at": warehouse.timestamps(n, warehouse.now()),
    }
    return pa.table(
        [
            pa.array(columns[f.name], f.type)
            if not isinstance(columns[f.name], pa.ChunkedArray | pa.Array)
            else columns[f.name].cast(f.type)
            for f in schema
        ],
        schema=schema,
    )


def run_record(
    spec: JobSpec,
    prepared: Prepared,
    plan_info: PlanInfo,
    engine_stats: list[dict[str, Any]],
    counts: dict[str, int],
    timings: dict[str, float],
    device: str,
) -> dict[str, Any]:
    """One row of the runs table: what ran, how much, how long, how much was shared."""
    prompt_tokens = prepared.prompts.prompt_tokens_logical
    output_tokens = sum(int(s.get("output_tokens", 0)) for s in engine_stats)
    logical = sum(int(s.get("prompt_tokens_logical", 0)) for s in engine_stats)
    computed = sum(int(s.get("prompt_tokens_computed", 0)) for s in engine_stats)
    infer_s = timings.get("infer_s", 0.0)
    processed = counts.get("rows_processed", 0)
    return {
        "run_id": prepared.run_id,
        "job": spec.name,
        "spec_hash": spec.spec_hash,
        "params_hash": spec.params_hash,
        "model": spec.model,
        "task": spec.task.kind,
        "device": device,
        "mode": spec.output.mode,
        "incremental": spec.incremental,
        "started_at": prepared.started_at,
        "finished_at": warehouse.now(),
        "rows_total": prepared.rows_total,
        "rows_skipped": prepared.rows_skipped,
        "rows_recovered": prepared.rows_recovered,
        "rows_processed": processed,
        "rows_ok": counts.get("rows_ok", 0),
        "rows_error": counts.get("rows_error", 0),
        "distinct_prompts": prepared.prompts.num_prompts,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "planned_saving_ratio": float(plan_info.stats.get("saving_ratio", 0.0)),
        "achieved_saving_ratio": (1.0 - computed / logical) if logical else 0.0,
        "rows_per_s": processed / infer_s if infer_s > 0 else 0.0,
        "tokens_per_s": (prompt_tokens + output_tokens) / infer_s if infer_s > 0 else 0.0,
        "timings": {**prepared.timings, **timings},
        "planner": plan_info.stats,
        "engine": engine_stats,
    }


def markdown_report(run: dict[str, Any], table: str) -> str:
    """The run's statistics as a short markdown page (Prefect artifact, terminal)."""
    t = run["timings"]
    lines = [
        f"# batchllm run `{run['run_id']}` -> `{table}`",
        "",
        f"- model `{run['model']}` on {run['device']}, task {run['task']}, mode {run['mode']}",
        f"- rows: {run['rows_total']} read, {run['rows_skipped']} skipped (done), "
        f"{run['rows_recovered']} recovered, {run['rows_processed']} processed, "
        f"{run['rows_ok']} ok, **{run['rows_error']} errors**",
        f"- tokens: {run['prompt_tokens']} prompt ({run['distinct_prompts']} distinct prompts), "
        f"{run['output_tokens']} output",
        f"- prefix sharing: planned saving {run['planned_saving_ratio']:.1%}, "
        f"achieved {run['achieved_saving_ratio']:.1%}",
        f"- throughput: {run['rows_per_s']:.2f} rows/s, {run['tokens_per_s']:.1f} tokens/s",
        "- durations: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()),
    ]
    return "\n".join(lines) + "\n"


def stats_table(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's scalar statistics as (stat, value) rows for a table artifact."""
    rows = [{"stat": k, "value": v} for k, v in run.items() if not isinstance(v, dict | list)]
    rows += [{"stat": f"time.{k}", "value": round(v, 3)} for k, v in run["timings"].items()]
    return [{"stat": r["stat"], "value": str(r["value"])} for r in rows]


def count_status(table: pa.Table) -> tuple[int, int]:
    """(ok, error) rows of a results batch."""
    status = table.column("status").to_pylist()
    ok = sum(1 for s in status if s == warehouse.STATUS_OK)
    return ok, len(status) - ok


def dry_run(spec: JobSpec) -> dict[str, Any]:
    """What a run would do, without loading weights or writing anything: rows, tokens, sharing, cost."""
    check(spec)
    table = warehouse.extract(spec)
    prepared = prepare(spec, table, dry_run=True)
    info = plan(spec, prepared)
    decode = decode_budget(spec)
    ok_prompts = sum(len(s) for s in info.shards)
    physical = int(info.stats.get("physical_tokens", 0))
    compute_tokens = physical + decode * ok_prompts
    params = model_params(Path(prepared.model_folder))
    return {
        "rows_total": prepared.rows_total,
        "rows_skipped": prepared.rows_skipped,
        "rows_recovered": prepared.rows_recovered,
        "rows_to_run": prepared.prompts.num_rows,
        "rows_error": int((prepared.prompts.row_prompt < 0).sum()),
        "distinct_prompts": prepared.prompts.num_prompts,
        "prompt_tokens": prepared.prompts.prompt_tokens_logical,
        "planned_prompt_tokens": physical,
        "saving_ratio": float(info.stats.get("saving_ratio", 0.0)),
        "groups": int(info.stats.get("groups", 0)),
        "shards": len(info.shards),
        "max_decode_tokens": decode * ok_prompts,
        "estimated_compute_tokens": compute_tokens,
        "model_params": params,
        "estimated_tflop": 2.0 * params * compute_tokens / 1e12 if params else None,
        "planner": info.stats,
    }


def model_params(folder: Path) -> int | None:
    """Parameter count of a Llama-family config.json (for cost estimates; no weights read)."""
    import json

    path = folder / "config.json"
    if not path.is_file():
        return None
    c = json.loads(path.read_text())
    try:
        h, inter, layers, vocab = (
            c["hidden_size"],
            c["intermediate_size"],
            c["num_hidden_layers"],
            c["vocab_size"],
        )
        heads = c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads", heads)
        head_dim = c.get("head_dim") or h // heads
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    per_layer = attn + 3 * h * inter + 2 * h
    embed = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return int(layers * per_layer + embed + h)
