"""A table's rows as `batchllm show` prints them: for a results table the columns a reader wants,
and each value in one short cell."""

from __future__ import annotations

from typing import Any

from batchllm.warehouse import RUNS_MARKS

RESULT_COLUMNS = (
    "id",
    "query_key",
    "candidate_key",
    "status",
    "label",
    "label_probs",
    "score",
    "output",
    "error",
)
RESULT_COLUMNS += ("prompt_tokens", "output_tokens")
# bookkeeping columns of a results table that a reader skims past
META_COLUMNS = frozenset(
    {"prompt_hash", "model", "params_hash", "task", "cached_tokens", "finish_reason", "run_id", "created_at"}
)


# a runs table's columns a reader scans for (the run id to pass to `batchllm report`)
RUN_COLUMNS = (
    "run_id",
    "job",
    "started_at",
    "rows_processed",
    "rows_ok",
    "rows_error",
    "rows_per_s",
    "achieved_saving_ratio",
    "device",
)


def useful_columns(rows: Any) -> list[str]:
    """For a results table, the columns a reader wants (skipping all-null ones): the known result
    columns, then any other column that is not bookkeeping (typed output: ``parsed`` or one per
    field); for a runs table ``RUN_COLUMNS``; else all columns."""
    names = rows.column_names
    if set(RUNS_MARKS) <= set(names):
        return [c for c in RUN_COLUMNS if c in names]
    if not {"status", "prompt_hash", "run_id"} <= set(names):
        return list(names)
    known = [c for c in RESULT_COLUMNS if c in names]
    extra = [c for c in names if c not in RESULT_COLUMNS and c not in META_COLUMNS]
    return [c for c in known + extra if c == "id" or rows.column(c).null_count < rows.num_rows]


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list) and value and isinstance(value[0], tuple):  # a MAP as key/value pairs
        value = dict(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."
