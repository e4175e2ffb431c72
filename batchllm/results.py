"""Result rows: the results table's schema and the rows a run writes into it.

One row per source id; rows that share a prompt (dedup) get the same outcome,
fanned out here. Kept apart from the steps (job.py) and the I/O (warehouse.py)
so the table's shape is defined in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchllm import typed, warehouse
from batchllm.backends.base import Outcome
from batchllm.spec import SpecError

if TYPE_CHECKING:
    from batchllm.job import Prepared
    from batchllm.spec import JobSpec

STATUS_OK = "ok"
STATUS_ERROR = "error"


KEY_COLUMNS = ("query_key", "candidate_key")  # a score task's join keys (render.score_keys)


def results_schema(
    id_type: pa.DataType,
    key_types: dict[str, pa.DataType] | None = None,
    typed: list[pa.Field] | None = None,
) -> pa.Schema:
    """One row per source id: what was asked (hashes, model), what came back, and how it went.

    A ``score`` task's rows also keep the join's keys (``key_types``: query_key,
    candidate_key), so SQL ranks candidates per query: ``ORDER BY score DESC``.
    A typed generate task's rows have its columns (``typed``, after ``output``).
    """
    keys = [pa.field(name, t) for name, t in (key_types or {}).items()]
    return pa.schema(
        [
            pa.field("id", id_type),
            *keys,
            pa.field("prompt_hash", pa.string()),
            pa.field("model", pa.string()),
            pa.field("params_hash", pa.string()),
            pa.field("task", pa.string()),
            pa.field("output", pa.large_string()),
            *(typed or []),
            pa.field("label", pa.string()),
            pa.field("score", pa.float64()),
            pa.field("label_probs", pa.map_(pa.string(), pa.float64())),
            pa.field("prompt_tokens", pa.int32()),
            pa.field("output_tokens", pa.int32()),
            pa.field("cached_tokens", pa.int32()),
            pa.field("finish_reason", pa.string()),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
            pa.field("run_id", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def run_schema(spec: JobSpec, rows: pa.Schema) -> pa.Schema:
    """The results schema of a run whose rendered rows (``render.render_rows``) have ``rows``' types."""
    keys = {name: rows.field(name).type for name in KEY_COLUMNS if name in rows.names}
    fmt = spec.task.format
    return results_schema(rows.field("id").type, keys, typed.typed_fields(fmt) if fmt else None)


def result_rows(spec: JobSpec, prepared: Prepared, indices: list[int], outcomes: list[Outcome]) -> pa.Table:
    """Result rows of every row whose prompt is among ``indices``; duplicates fan out."""
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


def check_typed_columns(spec: JobSpec) -> None:
    """A flat typed column must not take the name of a results column or of another field, in
    DuckDB's case-blind names (checked before a run; DuckDB renamed a second ``A`` beside ``a``)."""
    fmt = spec.task.format
    if fmt is None or fmt.columns != "flat":
        return
    taken = {name.lower() for name in (*results_schema(pa.int64()).names, *KEY_COLUMNS)}
    fields: dict[str, str] = {}
    for f in typed.typed_fields(fmt):
        if f.name.lower() in taken:
            raise SpecError(
                f"task.format: field {f.name!r} would replace the results column of that name "
                "(rename it, or use columns: struct)"
            )
        if (other := fields.setdefault(f.name.lower(), f.name)) != f.name:
            raise SpecError(
                f"task.format: fields {other!r} and {f.name!r} would be one column (column names "
                "ignore case; rename one, or use columns: struct)"
            )


def count_status(table: pa.Table) -> tuple[int, int]:
    """(ok, error) rows of a results batch."""
    status = table.column("status").to_pylist()
    ok = sum(1 for s in status if s == STATUS_OK)
    return ok, len(status) - ok


def _rows(spec: JobSpec, prepared: Prepared, positions: list[int], outcomes: list[Outcome]) -> pa.Table:
    rows = prepared.prompts.rows.take(pa.array(positions, pa.int64()))
    n = len(positions)
    schema = run_schema(spec, rows.schema)
    keys = [name for name in KEY_COLUMNS if name in rows.column_names]
    fmt = spec.task.format
    typed_cols: dict[str, Any] = {}
    errors = [o.error for o in outcomes]
    if fmt is not None:  # a valid output gets typed values; an invalid one becomes an error row
        typed_cols, invalid = typed.typed_columns(
            fmt, [o.output for o in outcomes], [o.finish_reason for o in outcomes]
        )
        errors = [e or v for e, v in zip(errors, invalid, strict=True)]
    lens = prepared.prompts.lengths
    row_prompt = prepared.prompts.row_prompt
    prompt_tokens = [
        int(lens[row_prompt[i]]) if row_prompt[i] >= 0 else o.prompt_tokens
        for i, o in zip(positions, outcomes, strict=True)
    ]
    columns: dict[str, Any] = {
        "id": rows.column("id"),
        **{name: rows.column(name) for name in keys},
        "prompt_hash": rows.column("prompt_hash"),
        "model": [spec.model] * n,
        "params_hash": [spec.params_hash] * n,
        "task": [spec.task.kind] * n,
        "output": [o.output for o in outcomes],
        **typed_cols,
        "label": [o.label for o in outcomes],
        "score": [o.score for o in outcomes],
        "label_probs": [None if o.label_probs is None else list(o.label_probs.items()) for o in outcomes],
        "prompt_tokens": prompt_tokens,
        "output_tokens": [o.output_tokens for o in outcomes],
        "cached_tokens": [o.cached_tokens for o in outcomes],
        "finish_reason": [o.finish_reason for o in outcomes],
        "status": [STATUS_ERROR if e else STATUS_OK for e in errors],
        "error": errors,
        "run_id": [prepared.run_id] * n,
        "created_at": warehouse.timestamps(n, warehouse.now()),
    }
    return pa.table(
        [
            columns[f.name].cast(f.type)
            if isinstance(columns[f.name], pa.ChunkedArray | pa.Array)
            else pa.array(columns[f.name], f.type)
            for f in schema
        ],
        schema=schema,
    )
