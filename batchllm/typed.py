"""Typed results of a generate task with ``task.format``: each output parsed, validated, typed.

The grammar keeps every generated token valid, but an output can still end
before its value is complete (max_tokens, a stop string): such a row fails
validation here and becomes an error row with the reason; the raw text stays
in ``output``. Valid values land in one STRUCT column ``parsed`` (or a column
per top-level property with ``columns: flat``; a plain string for choice and
regex), typed from the schema, so SQL reads ``parsed.sentiment`` directly.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import pyarrow as pa

from batchllm.shape import FormatSpec, TypeTree

PARSED = "parsed"
_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def arrow_type(tree: TypeTree) -> pa.DataType:
    """The Arrow (so DuckDB) type of a schema's type tree: STRUCT, LIST or a scalar."""
    if tree[0] == "struct":
        return pa.struct([pa.field(name, arrow_type(sub)) for name, sub in tree[1]])
    if tree[0] == "list":
        return pa.list_(arrow_type(tree[1]))
    return _SCALARS[tree[0]]


def typed_fields(fmt: FormatSpec) -> list[pa.Field]:
    """The result columns a format adds: ``parsed``, or one per top-level property (flat)."""
    tree = fmt.type_tree()
    if fmt.columns == "flat":
        return [pa.field(name, arrow_type(sub)) for name, sub in tree[1]]
    return [pa.field(PARSED, arrow_type(tree))]


def parse(fmt: FormatSpec, text: str | None, finish_reason: str | None) -> tuple[Any, str | None]:
    """(value, None) for a valid output, else (None, why): a message for the row's error column."""
    return _parse(fmt, fmt.grammar()[1], fmt.type_tree(), text, finish_reason)


def _parse(
    fmt: FormatSpec, schema_text: str, tree: TypeTree, text: str | None, finish_reason: str | None
) -> tuple[Any, str | None]:
    if text is None:
        return None, None
    cut = " (cut by max_tokens before the value was complete)" if finish_reason == "length" else ""
    if fmt.choice is not None:
        if text in fmt.choice:
            return text, None
        return None, f"format: output {_short(text)} is not one of the choices{cut}"
    if fmt.regex is not None:
        if re.fullmatch(fmt.regex, text, re.DOTALL):  # the grammar's '.' matches a newline too
            return text, None
        return None, f"format: output {_short(text)} does not match the regex{cut}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"format: output is not valid JSON: {exc}{cut}"
    error = next(iter(_validator(schema_text).iter_errors(value)), None)
    if error is not None:
        at = ".".join(str(p) for p in error.absolute_path)
        return None, f"format: output does not match the schema{f' at {at}' if at else ''}: {error.message}"
    try:  # valid JSON may still not fit its column: an integer beyond 64 bits or a float's range, a
        # lone surrogate escape in a string
        value = _coerce(value, tree)
        pa.scalar(value, arrow_type(tree))
    except (pa.ArrowException, OverflowError, UnicodeError, ValueError) as exc:
        return None, f"format: output does not fit its column type {arrow_type(tree)}: {exc}"
    return value, None


@cache
def _validator(schema_text: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema_text))


def _coerce(value: Any, tree: TypeTree) -> Any:
    """A valid JSON value in its column's Python type (1.0 for an integer field -> 1; 1 for a number -> 1.0)."""
    if value is None:
        return None
    kind = tree[0]
    if kind == "struct":
        return {name: _coerce(value.get(name), sub) for name, sub in tree[1]}
    if kind == "list":
        return [_coerce(v, tree[1]) for v in value]
    if kind == "integer":
        return int(value)
    if kind == "number":
        return float(value)
    return value


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def typed_columns(
    fmt: FormatSpec, texts: list[str | None], finish_reasons: list[str | None]
) -> tuple[dict[str, pa.Array], list[str | None]]:
    """The typed columns of a batch of outputs and, per row, the validation error (None when valid)."""
    values, errors = [], []
    schema_text, tree = fmt.grammar()[1], fmt.type_tree()
    for text, reason in zip(texts, finish_reasons, strict=True):
        value, error = _parse(fmt, schema_text, tree, text, reason)
        values.append(value)
        errors.append(error)
    fields = typed_fields(fmt)
    if fmt.columns == "flat":
        return {
            f.name: pa.array([None if v is None else v[f.name] for v in values], f.type) for f in fields
        }, errors
    return {PARSED: pa.array(values, fields[0].type)}, errors
