"""Rows -> prompt text -> token ids, with per-row errors, prompt hashing and dedup.

Two steps so incremental runs stay cheap: ``render_rows`` turns each row into
its final prompt text (Jinja2 templates, then the model's chat template) and
hashes it, with no tokenization; the caller drops rows that already have a
result; ``tokenize`` then encodes only the distinct remaining prompts and
checks their length. A row that cannot be rendered (a null or undecodable
field, a template runtime error) or is too long becomes an error row; it never
stops the others.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchllm.engine.tokenizer import Tokenizer
from batchllm.plan.fields import encode, reorder
from batchllm.spec import JobSpec, template_env


@dataclass(frozen=True)
class Prompts:
    """Distinct prompts to run, and for each rendered row the prompt it maps to.

    rows: the rendered rows (id, prompt_hash, prompt, error) with ``error`` now also
    set for prompts that are too long; ``row_prompt``: index into ``token_ids`` per
    row, -1 for error rows; ``token_ids``: one int32 array per distinct prompt.
    """

    rows: pa.Table
    row_prompt: np.ndarray
    token_ids: list[np.ndarray]

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    @property
    def num_prompts(self) -> int:
        return len(self.token_ids)

    @cached_property
    def lengths(self) -> np.ndarray:
        """Token count of each distinct prompt (int64)."""
        return np.fromiter((len(t) for t in self.token_ids), dtype=np.int64, count=len(self.token_ids))

    @property
    def prompt_tokens_logical(self) -> int:
        """Prompt tokens over all ok rows, duplicates counted."""
        ok = self.row_prompt[self.row_prompt >= 0]
        return int(self.lengths[ok].sum()) if len(ok) else 0


def prompt_hash(text: str) -> str:
    """Stable identity of a prompt: sha256 of its final text (after the chat template)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


REORDER_METHOD = "level"  # planner for prompt.reorderable (fields.METHODS); bench.plan_real compares


def field_order(spec: JobSpec, table: pa.Table) -> list[list[str]] | None:
    """Per-row order of the reorderable fields (None when the template has none).

    Planned over the whole batch for shared prefixes (DESIGN 4.4, batchllm.plan.fields):
    deterministic for a given table, the declared order when reordering would share less.
    The order depends on the other rows, so a row's prompt (and hash) can change when the
    batch does; whether answers may depend on field order is the user's call.
    """
    names = list(spec.prompt.reorderable)
    if not names:
        return None
    planned = reorder(encode({n: table.column(n) for n in names}, names), REORDER_METHOD)
    return planned.names(names)


def render_rows(spec: JobSpec, table: pa.Table, tokenizer: Tokenizer | None) -> pa.Table:
    """Render every row's prompt text and hash. Returns (id, prompt_hash, prompt, error), and for a
    ``score`` task the join's keys (query_key, candidate_key) as the source typed them.

    ``tokenizer`` supplies the chat template for system/user messages; a raw
    ``template`` prompt needs none.
    """
    templates = {k: template_env().from_string(v) for k, v in spec.prompt.templates().items()}
    used = sorted(spec.prompt.fields() | set(spec.prompt.reorderable))
    columns = {name: table.column(name).to_pylist() for name in used if name in table.column_names}
    types = {name: table.schema.field(name).type for name in columns}
    orders = field_order(spec, table)
    hashes: list[str | None] = []
    texts: list[str | None] = []
    errors: list[str | None] = []
    chat_cache: dict[tuple[str | None, str], str] = {}
    control = _chat_control(tokenizer)
    keys = score_keys(spec, table)
    key_errors = _key_errors(spec, keys)
    for i in range(table.num_rows):
        try:
            if i in key_errors:
                raise RowError(key_errors[i])
            values = {name: _value(name, col[i], types[name]) for name, col in columns.items()}
            _check_control(values, control)
            if orders is not None:
                values["fields"] = [(n, values[n]) for n in orders[i]]
            text = _render_one(spec, templates, values, tokenizer, chat_cache)
        except RowError as exc:
            hashes.append(None)
            texts.append(None)
            errors.append(str(exc))
            continue
        hashes.append(prompt_hash(text))
        texts.append(text)
        errors.append(None)
    return pa.table(
        {
            "id": table.column(spec.source.id_column),
            **keys,
            "prompt_hash": pa.array(hashes, pa.string()),
            "prompt": pa.array(texts, pa.large_string()),
            "error": pa.array(errors, pa.string()),
        }
    )


def score_keys(spec: JobSpec, table: pa.Table) -> dict[str, Any]:
    """The join's key columns of a ``score`` task, as results columns (none for other tasks)."""
    if spec.task.kind != "score":
        return {}
    assert spec.task.query_key is not None and spec.task.candidate_key is not None
    return {
        "query_key": table.column(spec.task.query_key),
        "candidate_key": table.column(spec.task.candidate_key),
    }


def _key_errors(spec: JobSpec, keys: dict[str, Any]) -> dict[int, str]:
    """Rows of a score task that lack a key: a query without candidates (an outer join's null)."""
    if not keys:
        return {}
    out: dict[int, str] = {}
    query = keys["query_key"]
    for i in np.flatnonzero(pc.is_null(keys["candidate_key"]).to_numpy(zero_copy_only=False)).tolist():
        out[i] = (
            f"query {query[i].as_py()!r} has no candidates (task.candidate_key "
            f"{spec.task.candidate_key!r} is null)"
        )
    for i in np.flatnonzero(pc.is_null(query).to_numpy(zero_copy_only=False)).tolist():
        out[i] = f"task.query_key {spec.task.query_key!r} is null"
    return out


class RowError(ValueError):
    """A row that cannot become a prompt; becomes status=error for that row only."""


def _value(name: str, value: Any, dtype: pa.DataType) -> Any:
    if value is None:
        raise RowError(f"field {name!r} is null")
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError(f"field {name!r} is not valid UTF-8 (byte {exc.start})") from None
    if pa.types.is_floating(dtype) and value != value:
        raise RowError(f"field {name!r} is NaN")
    return value


def _chat_control(tokenizer: Tokenizer | None) -> re.Pattern[str] | None:
    """The model's chat-structure tokens (those its chat template writes, and bos/eos) as one
    pattern: in a field's text they would encode as control tokens, so data could open a turn."""
    if tokenizer is None:
        return None
    frame = (tokenizer.chat_template or "", tokenizer.bos_token or "", tokenizer.eos_token or "")
    found = [t for t in tokenizer.special_tokens if any(t in f for f in frame)]
    return re.compile("|".join(map(re.escape, sorted(found, key=len, reverse=True)))) if found else None


def _check_control(values: dict[str, Any], control: re.Pattern[str] | None) -> None:
    """Raises RowError for a control token in any text of a field, inside lists and structs too."""
    if control is None:
        return
    for name, value in values.items():
        if (hit := _control_in(value, control)) is not None:
            raise RowError(
                f"field {name!r} contains the model's control token {hit!r} (as data it would "
                "be read as chat structure); remove it in the query, e.g. with replace()"
            )


def _control_in(value: Any, control: re.Pattern[str]) -> str | None:
    """The first control token in a value's texts: a string, or the keys and items of lists and dicts."""
    if isinstance(value, str):
        return hit.group() if (hit := control.search(value)) else None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        return next((hit for v in value if (hit := _control_in(v, control)) is not None), None)
    return None


def _render_one(
    spec: JobSpec,
    templates: dict[str, Any],
    values: dict[str, Any],
    tokenizer: Tokenizer | None,
    chat_cache: dict[tuple[str | None, str], str],
) -> str:
    try:
        rendered = {k: t.render(values) for k, t in templates.items()}
    except Exception as exc:  # a runtime template error belongs to this row only
        raise RowError(f"template error: {type(exc).__name__}: {exc}") from None
    if "template" in rendered:
        return rendered["template"]
    key = (rendered.get("system"), rendered["user"])
    if key not in chat_cache:
        if tokenizer is None:
            raise ValueError("render: chat messages need the model's tokenizer (chat template)")
        messages = [{"role": "user", "content": rendered["user"]}]
        if rendered.get("system") is not None:
            messages.insert(0, {"role": "system", "content": rendered["system"]})
        chat_cache[key] = tokenizer.apply_chat_template(messages)
    return chat_cache[key]


def tokenize(
    rows: pa.Table,
    tokenizer: Tokenizer,
    max_prompt_tokens: int | None,
) -> Prompts:
    """Encode the distinct prompts of the ok rows; rows with no tokens or over ``max_prompt_tokens``
    become errors."""
    hashes = rows.column("prompt_hash").to_pylist()
    texts = rows.column("prompt").to_pylist()
    errors = rows.column("error").to_pylist()
    distinct: dict[str, int] = {}
    distinct_texts: list[str] = []
    row_prompt = np.full(len(hashes), -1, dtype=np.int64)
    for i, (h, text, err) in enumerate(zip(hashes, texts, errors, strict=True)):
        if err is not None or h is None:
            continue
        if h not in distinct:
            distinct[h] = len(distinct_texts)
            distinct_texts.append(text)
        row_prompt[i] = distinct[h]
    token_ids = tokenizer.encode_batch(distinct_texts) if distinct_texts else []
    limit = max_prompt_tokens if max_prompt_tokens is not None else float("inf")
    bad = {j for j, ids in enumerate(token_ids) if len(ids) == 0 or len(ids) > limit}
    if bad:
        for i, j in enumerate(row_prompt):
            if j in bad:
                n = len(token_ids[j])
                errors[i] = (
                    "prompt is empty (the template rendered no tokens for this row)"
                    if n == 0
                    else f"prompt has {n} tokens, over the limit of {max_prompt_tokens} "
                    "(limits.max_prompt_tokens or the model's context)"
                )
                row_prompt[i] = -1
        token_ids, row_prompt = _compact(token_ids, row_prompt)
    rows = rows.set_column(rows.column_names.index("error"), "error", pa.array(errors, pa.string()))
    return Prompts(rows=rows, row_prompt=row_prompt, token_ids=token_ids)


def _compact(token_ids: list[np.ndarray], row_prompt: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Drop prompts no row refers to any more and renumber the rows' references."""
    used = np.unique(row_prompt[row_prompt >= 0])
    remap = np.full(len(token_ids), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    new_rows = np.where(row_prompt >= 0, remap[np.maximum(row_prompt, 0)], -1)
    return [token_ids[j] for j in used], new_rows


def prompt_limit(spec: JobSpec, model_context: int | None) -> int | None:
    """The longest prompt a row may have: the spec's limit, and room for one output token."""
    limits = [
        v for v in (spec.limits.max_prompt_tokens, None if model_context is None else model_context - 1) if v
    ]
    return min(limits) if limits else None


def drop_done(rows: pa.Table, done: pa.Table) -> tuple[pa.Table, int]:
    """Remove rendered rows whose (id, prompt_hash) already has an ok result. Returns (rows, skipped)."""
    if done.num_rows == 0 or rows.num_rows == 0:
        return rows, 0
    done = done.select(["id", "prompt_hash"]).group_by(["id", "prompt_hash"]).aggregate([])
    done = done.select(["id", "prompt_hash"])
    if done.schema.field("id").type != rows.schema.field("id").type:
        done = done.set_column(0, "id", pc.cast(done.column("id"), rows.schema.field("id").type))
    marker = done.append_column("_done", pa.array(np.ones(done.num_rows, dtype=bool)))
    joined = rows.append_column("_pos", pa.array(np.arange(rows.num_rows))).join(
        marker, keys=["id", "prompt_hash"], join_type="left outer"
    )
    keep_pos = np.sort(pc.filter(joined.column("_pos"), pc.is_null(joined.column("_done"))).to_numpy())
    kept = rows.take(pa.array(keep_pos))
    return kept, rows.num_rows - kept.num_rows
