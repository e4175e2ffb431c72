"""`batchllm plan FILE`: plan a file of prompts and print the prefix-sharing statistics.

The file is JSONL or Parquet with one prompt per row, given as token ids (a
list of ints) or as text. Text needs a tokenizer (a model folder or "default");
a column of chat messages ([{"role": ..., "content": ...}, ...]) is rendered
with the tokenizer's chat template first. The column is found by name (see
ID_COLUMNS, TEXT_COLUMNS, MESSAGE_COLUMNS) unless given. A per-row
``max_tokens`` column, when present, overrides the default decode estimate.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchllm.plan import Plan, TokenTable, build_plan

ID_COLUMNS = ("token_ids", "input_ids", "prompt_token_ids", "tokens", "ids")
TEXT_COLUMNS = ("prompt", "text", "input", "content")
MESSAGE_COLUMNS = ("messages", "chat")
DEFAULT_MAX_TOKENS = 128


class PlanFileError(ValueError):
    """A prompt file that cannot be planned, with the reason in the message."""


@dataclass
class LoadedPrompts:
    table: TokenTable
    max_tokens: np.ndarray | None
    column: str
    kind: str  # "token_ids", "text" or "messages"
    tokenizer: str | None


def load_prompts(path: str | Path, tokenizer: str | None = None, column: str | None = None) -> LoadedPrompts:
    """Read a JSONL or Parquet prompt file into token ids (tokenizing text if needed)."""
    path = Path(path)
    if not path.is_file():
        raise PlanFileError(f"plan: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".parquet" or suffix == ".pq":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        table = _read_jsonl(path)
    else:
        raise PlanFileError(f"plan: {path.name!r}: expected a .jsonl or .parquet file of prompts")
    return _from_arrow_table(table, tokenizer, column, path.name)


def _read_jsonl(path: Path) -> Any:
    """JSONL rows: objects, or bare token lists / strings (put under "token_ids" / "prompt")."""
    import pyarrow as pa

    rows: list[Any] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PlanFileError(f"plan: {path.name}:{lineno}: not JSON ({exc.msg})") from None
    if not rows:
        raise PlanFileError(f"plan: {path.name!r} holds no prompts")
    if all(isinstance(r, list) for r in rows):
        return pa.table({"token_ids": pa.array(rows, type=pa.list_(pa.int64()))})
    if all(isinstance(r, str) for r in rows):
        return pa.table({"prompt": pa.array(rows, type=pa.string())})
    if not all(isinstance(r, dict) for r in rows):
        raise PlanFileError(f"plan: {path.name!r}: rows must all be objects, token lists or strings")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise PlanFileError(f"plan: {path.name!r}: inconsistent rows ({exc})") from None


def _from_arrow_table(table: Any, tokenizer: str | None, column: str | None, name: str) -> LoadedPrompts:
    import pyarrow as pa

    names = table.column_names
    if column is None:
        column = next((c for c in (*ID_COLUMNS, *MESSAGE_COLUMNS, *TEXT_COLUMNS) if c in names), None)
        if column is None:
            raise PlanFileError(
                f"plan: {name!r} has no prompt column; expected one of "
                f"{', '.join(ID_COLUMNS + MESSAGE_COLUMNS + TEXT_COLUMNS)} (has: {', '.join(names)})"
            )
    elif column not in names:
        raise PlanFileError(f"plan: {name!r} has no column {column!r} (has: {', '.join(names)})")
    col = table.column(column)
    if col.null_count:
        raise PlanFileError(f"plan: column {column!r} has {col.null_count} empty rows")
    max_tokens = None
    if "max_tokens" in names:
        mt = table.column("max_tokens")
        if mt.null_count or not pa.types.is_integer(mt.type):
            raise PlanFileError("plan: column 'max_tokens' must hold integers in every row")
        max_tokens = mt.to_numpy().astype(np.int64)
    typ = col.type
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        value_type = typ.value_type
        if pa.types.is_integer(value_type):
            return LoadedPrompts(TokenTable.from_prompts(col), max_tokens, column, "token_ids", None)
        if pa.types.is_struct(value_type):
            tok = _tokenizer(tokenizer)
            texts = [tok.apply_chat_template(m) for m in col.to_pylist()]
            return LoadedPrompts(_encode(tok, texts), max_tokens, column, "messages", tokenizer or "default")
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        tok = _tokenizer(tokenizer)
        return LoadedPrompts(
            _encode(tok, col.to_pylist()), max_tokens, column, "text", tokenizer or "default"
        )
    raise PlanFileError(f"plan: column {column!r} has type {typ}; expected token ids, text or chat messages")


def _tokenizer(name: str | None) -> Any:
    from batchllm.engine.tokenizer import Tokenizer
    from batchllm.models import resolve_model

    return Tokenizer(resolve_model(name or "default"))


def _encode(tok: Any, texts: list[str]) -> TokenTable:
    ids = tok.encode_batch(texts)
    if any(len(x) == 0 for x in ids):
        raise PlanFileError("plan: some prompts encode to no tokens")
    return TokenTable.from_prompts(ids)


def plan_file(
    path: str | Path,
    tokenizer: str | None = None,
    block_size: int = 16,
    max_tokens: int | None = None,
    column: str | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """Load and plan a prompt file; returns the plan and a JSON-ready summary."""
    t0 = time.perf_counter()
    loaded = load_prompts(path, tokenizer, column)
    t1 = time.perf_counter()
    if loaded.max_tokens is not None and max_tokens is None:
        decode: np.ndarray | int = loaded.max_tokens
    else:
        decode = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    plan = build_plan(loaded.table, decode, block_size=block_size)
    t2 = time.perf_counter()
    summary: dict[str, Any] = {
        "file": str(path),
        "column": loaded.column,
        "input": loaded.kind,
        "tokenizer": loaded.tokenizer,
        "block_size": block_size,
        **plan.stats.to_dict(),
        "load_seconds": round(t1 - t0, 3),
        "plan_seconds": round(t2 - t1, 3),
    }
    return plan, summary


def plan_file_command(
    path: str | Path, tokenizer: str | None, block_size: int, max_tokens: int | None, as_json: bool
) -> None:
    """Entry point of `batchllm plan FILE` for JSONL/Parquet prompt files."""
    try:
        _, summary = plan_file(path, tokenizer, block_size, max_tokens)
    except (PlanFileError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if as_json:
        print(json.dumps(summary))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prefix plan for {Path(path).name}", show_header=False)
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        table.add_row(key, str(value))
    Console().print(table)
