"""The steps of one batch job, free of Prefect and engine-free except ``infer_shard``.

extract -> prepare (render, skip done rows, dedup, tokenize) -> plan (prefix
groups, shards) -> infer_shard (one backend per shard) -> stage -> load ->
report; the Prefect flow calls them in order. Result rows are built in
results.py, the run's statistics in report.py. ``batchllm plan`` runs the
first three steps only: no weights are loaded.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from batchllm import output_check, render, results, warehouse
from batchllm.backends.base import (
    Backend,
    GroupSpec,
    Outcome,
    Progress,
    create_backend,
    options_problem,
    resolve_device,
    supports,
)
from batchllm.engine.config import ModelConfig, load_config
from batchllm.spec import JobSpec, SpecError, validate_columns

if TYPE_CHECKING:
    from batchllm.plan import Plan


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
    """Shards of distinct-prompt indices (plan order), the plan of each, and the planner's statistics."""

    shards: list[list[int]]
    stats: dict[str, Any]
    parts: list[Plan] = field(default_factory=list)

    def groups(self, shard: int) -> list[GroupSpec] | None:
        """The shard's groups as positions into its prompt list: the backend runs this plan as is."""
        if not self.parts:
            return None
        from batchllm.engine.requests import groups_from_plan

        return groups_from_plan(self.parts[shard], self.shards[shard])


def check(spec: JobSpec) -> None:
    """Checks that need code but no data or weights: the backend can run the task kind on the device."""
    if reason := supports(spec.backend, spec.task.kind):
        raise SpecError(reason)
    if spec.backend == "native" and spec.engine_options.get("block_size", spec.block_size) != spec.block_size:
        raise SpecError(
            f"engine_options.block_size: {spec.engine_options['block_size']} differs from block_size "
            f"{spec.block_size}, which the plan's shared prefixes are cut to; set block_size alone"
        )
    if reason := options_problem(spec.backend, engine_options(spec), _engine_device(spec)):
        # the native engine's block size is the job's own block_size field (equal, checked just above)
        raise SpecError(reason.replace("engine_options.block_size", "block_size", 1))
    # else it fails at model load; on Ray the GPUs are the cluster's (checked when it is joined)
    if spec.device == "cuda" and spec.executor.kind == "local" and resolve_device("auto") != "cuda":
        raise SpecError("device: 'cuda' but no CUDA device is visible here (use 'auto' or 'cpu')")
    if spec.task.format is not None:  # typed output: the backend, the grammar, the result columns
        from batchllm.constrained import check_format
        from batchllm.results import check_typed_columns

        check_format(spec)
        check_typed_columns(spec)


def validate(spec: JobSpec) -> None:
    """Everything checkable before a run starts: task support, the query's columns, the model folder."""
    check(spec)
    validate_columns(spec, warehouse.describe(spec))
    check_labels(spec, tokenizer_for(spec)[0])


def check_labels(spec: JobSpec, tokenizer: Any) -> None:
    """Every label must encode to at least one token (labels are scored on their whole token sequence,
    so shared first tokens and multi-token labels are fine); distinct labels must encode differently."""
    seen: dict[tuple[int, ...], str] = {}
    task = spec.task
    yes_no = task.kind == "score" and task.labels is None
    for i, label in enumerate(task.answer_labels()):
        field = ("task.no" if i else "task.yes") if yes_no else "task.labels"
        ids = tuple(tokenizer.encode(label))
        if not ids:
            raise SpecError(f"{field}: {label!r} encodes to no token")
        if ids in seen:
            raise SpecError(f"{field}: {seen[ids]!r} and {label!r} encode to the same tokens")
        seen[ids] = label


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def decode_budget(spec: JobSpec, prepared: Prepared) -> np.ndarray:
    """Output tokens per distinct prompt the plan and cost estimate count on: max_tokens, cut where the
    model's context ends first (the engine stops there); classify and score decode nothing."""
    lengths = np.fromiter((len(t) for t in prepared.prompts.token_ids), np.int64)
    if spec.task.kind != "generate":
        return np.zeros_like(lengths)
    budget = np.full_like(lengths, spec.sampling.max_tokens)
    if prepared.model_context is not None:
        budget = np.maximum(np.minimum(budget, prepared.model_context - lengths), 0)
    return budget


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


def model_config(folder: Path) -> ModelConfig | None:
    """The model's config.json, parsed once (None for a folder without one: context and size unknown).

    A config the engine cannot run fails here, as a spec error naming ``model``,
    before any row is rendered.
    """
    if not (Path(folder) / "config.json").is_file():
        return None
    try:
        return load_config(Path(folder))
    except (ValueError, KeyError, TypeError) as exc:
        message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        raise SpecError(
            message if message.startswith("model") else f"model: config.json: {message}"
        ) from None


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
    output_check.check_output(spec, results.run_schema(spec, rows.schema))
    t1 = time.perf_counter()
    if not dry_run:
        warehouse.prune_staging(spec, rows)
    recovered_keys = warehouse.done_keys(spec, include_results=False)
    rows, recovered = render.drop_done(rows, recovered_keys)
    skipped = 0
    if spec.incremental:  # staged rows were dropped just above: only the results table is left to check
        done = warehouse.done_keys(spec, include_results=True, include_staging=False)
        rows, skipped = render.drop_done(rows, done)
        if spec.limits.max_rows is not None:  # the rows to run, in the query's order (the read was not cut)
            rows = rows.slice(0, spec.limits.max_rows)
    t2 = time.perf_counter()
    config = model_config(folder)
    context = config.max_context if config else None
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


def plan(spec: JobSpec, prepared: Prepared, shards: int | None = None) -> PlanInfo:
    """Group the distinct prompts by shared prefix and cut whole groups into ``shards`` shards
    (default ``spec.shards``, and at least one per engine actor when the spec sets ``actors``)."""
    count = shards or max(spec.shards, spec.executor.actors or 1)
    return plan_prompts(prepared.prompts.token_ids, decode_budget(spec, prepared), spec.block_size, count)


def plan_prompts(
    token_ids: list[np.ndarray], decode: np.ndarray | int, block_size: int = 16, shards: int = 1
) -> PlanInfo:
    """The planning step on bare token ids (``decode``: output tokens per prompt), for table and file jobs."""
    from batchllm.plan import build_plan, shard_plan

    if not token_ids:
        return PlanInfo(shards=[], stats={"logical_tokens": 0, "physical_tokens": 0, "saving_ratio": 0.0})
    built = build_plan(token_ids, decode, block_size=block_size)
    parts = shard_plan(built, shards) if shards > 1 else [built]
    kept = [(inputs, part) for part in parts if (inputs := _shard_inputs(part))]
    stats = dict(built.stats.to_dict())
    if len(parts) > 1:  # a group split across shards computes its prefix once per shard
        stats["physical_tokens"] = physical = sum(p.stats.physical_tokens for p in parts)
        logical = stats["logical_tokens"]
        stats["saving_ratio"] = 1.0 - physical / logical if logical else 0.0
    return PlanInfo(shards=[inputs for inputs, _ in kept], stats=stats, parts=[part for _, part in kept])


def _shard_inputs(part: Any) -> list[int]:
    """A shard's prompts in execution order: group members first, then any exact duplicates."""
    members = part.members.tolist()
    seen = set(members)
    extra = [int(i) for i in part.inputs() if int(i) not in seen]
    return members + extra


def engine_options(spec: JobSpec) -> dict[str, Any]:
    """The options the job's backend is created with: the native engine's KV blocks are the plan's (a
    prefix planned to a block boundary the engine does not have would not be shared)."""
    blocks = {"block_size": spec.block_size} if spec.backend == "native" else {}
    return blocks | spec.engine_options


def load_backend(spec: JobSpec) -> Backend:
    """The job's model on the job's device, through the job's backend."""
    return create_backend(spec.backend, spec.model, spec.device, **engine_options(spec))


def infer_shard(
    spec: JobSpec,
    token_ids: list[np.ndarray],
    progress: Progress | None = None,
    groups: list[GroupSpec] | None = None,
    backend: Backend | None = None,
) -> tuple[list[Outcome], dict[str, Any]]:
    """Run one shard (``groups``: its plan, ``PlanInfo.groups``) on ``backend``, or on a backend
    loaded for this shard alone and closed after it (an engine actor passes its own, kept loaded).

    Returns outcomes (input order) and engine stats.
    """
    t0 = time.perf_counter()
    owned = backend is None
    engine = load_backend(spec) if backend is None else backend
    t1 = time.perf_counter()
    try:
        outcomes = engine.run(token_ids, spec.task, spec.sampling, progress=progress, groups=groups)
        stats = engine.stats()
    finally:
        if owned:
            engine.close()
    stats["load_s"] = t1 - t0
    stats["run_s"] = time.perf_counter() - t1
    return outcomes, stats


def device_name(spec: JobSpec) -> str:
    return resolve_device(spec.device)


def _engine_device(spec: JobSpec) -> str:
    """The device the job's engines get: here the job's ('auto': what is visible); on Ray the cluster's
    (a GPU unless the job says cpu)."""
    if spec.executor.kind == "local":
        return device_name(spec)
    return "cpu" if spec.device == "cpu" else "cuda"


def dry_run(spec: JobSpec) -> dict[str, Any]:
    """What a run would do, without loading weights or writing anything: rows, tokens, sharing, cost."""
    check(spec)
    table = warehouse.extract(spec)
    prepared = prepare(spec, table, dry_run=True)
    info = plan(spec, prepared)
    budget = decode_budget(spec, prepared)
    decode = int(sum(int(budget[np.asarray(shard, np.int64)].sum()) for shard in info.shards))
    physical = int(info.stats.get("physical_tokens", 0))
    compute_tokens = physical + decode
    config = model_config(Path(prepared.model_folder))
    params = config.num_params if config else None
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
        "max_decode_tokens": decode,
        "estimated_compute_tokens": compute_tokens,
        "format": spec.task.format.describe() if spec.task.format else None,
        "model_params": params,
        "estimated_tflop": 2.0 * params * compute_tokens / 1e12 if params else None,
        "planner": info.stats,
    }
