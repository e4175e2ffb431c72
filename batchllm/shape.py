"""Typed output of a generate task (``task.format``): a JSON schema, a field list, a choice or a regex.

Checked when the spec is parsed, before any model loads: one output kind, a
schema the meta-schema accepts, only the constructs a typed result column can
hold, and property names that are safe SQL identifiers (they become STRUCT
fields or columns). A field list is short syntax compiled to a JSON schema:

    fields:
      sentiment: [positive, negative, mixed]   # enum (add null to the list: nullable)
      mentions_acting: bool                    # str, int, float, bool; "?" suffix: nullable
      tags: list[str]                          # list of a scalar type
      cast: [{name: str, role: str?}]          # a one-mapping list: list of objects
      rating: {stars: int, reason: str}        # a mapping: nested object

Every property of a compiled field list is required (nullable ones may be
null), in the order given, and no other property is allowed. ``type_tree``
describes the one column type of a schema (torch- and pyarrow-free; results
turn it into Arrow types).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
SCALARS = {
    "str": "string",
    "string": "string",
    "int": "integer",
    "integer": "integer",
    "float": "number",
    "number": "number",
    "bool": "boolean",
    "boolean": "boolean",
}
# Keywords a schema may use: what the grammar library constrains and a typed column can hold.
KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "pattern", "format", "minItems", "maxItems", "title", "description", "$schema",
}  # fmt: skip
KINDS = ("json_schema", "fields", "choice", "regex")
# Type tree: ("string"|"integer"|"number"|"boolean",) | ("list", item) | ("struct", ((name, tree), ...))
TypeTree = tuple[Any, ...]


class FormatSpec(BaseModel):
    """The output shape. columns: ``struct`` (one STRUCT column ``parsed``) or ``flat`` (a column per
    top-level property). whitespace: ``any`` (JSON layout as the model writes it) or ``compact``.
    jump_forward: append tokens the grammar forces without sampling them (may tokenize differently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | str | None = None
    fields: dict[str, Any] | None = None
    choice: list[str] | None = None
    regex: str | None = None
    columns: Literal["struct", "flat"] = "struct"
    whitespace: Literal["any", "compact"] = "any"
    jump_forward: bool = False

    @model_validator(mode="after")
    def _check(self) -> FormatSpec:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"task.format: give exactly one of {', '.join(KINDS)} (got {len(given)})")
        kind = given[0]
        if kind == "choice":
            _check_choice(self.choice or [])
        elif kind == "regex":
            _check_regex(self.regex or "")
        else:
            check_schema(self.schema(), f"task.format.{kind}")
        if self.columns == "flat" and self.type_tree()[0] != "struct":
            raise ValueError("task.format.columns: 'flat' needs an object output (a column per property)")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema of a json_schema or fields output (None for choice and regex)."""
        if self.fields is not None:
            return compile_fields(self.fields, "task.format.fields")
        if isinstance(self.json_schema, str):
            try:
                value = json.loads(self.json_schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"task.format.json_schema: not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise ValueError("task.format.json_schema: must be a JSON object")
            return value
        return self.json_schema

    def grammar(self) -> tuple[str, str]:
        """(kind, source) for the engine: ("json_schema", schema text), ("regex", ...) or ("ebnf", ...)."""
        if self.choice is not None:
            return "ebnf", "root ::= " + " | ".join(_ebnf_literal(c) for c in self.choice)
        if self.regex is not None:
            return "regex", self.regex
        return "json_schema", json.dumps(self.schema())  # property order is generation order

    def type_tree(self) -> TypeTree:
        """The result column's type: a string for choice/regex, else the schema's tree."""
        schema = self.schema()
        return ("string",) if schema is None else type_tree(schema, "task.format")

    def describe(self) -> str:
        """One line for plans and reports."""
        if self.choice is not None:
            return "choice: " + " | ".join(self.choice)
        if self.regex is not None:
            return f"regex: {self.regex}"
        where = "a column per field" if self.columns == "flat" else "STRUCT parsed"
        return f"{self.kind} ({where}): {_summary(self.schema() or {})}"


def _summary(node: dict[str, Any]) -> str:
    """A schema in one short line: {name: type, ...}, [item], enum values as a|b, nullable as T?."""
    if "anyOf" in node:
        rest = [o for o in node["anyOf"] if o != {"type": "null"}]
        return _summary(rest[0]) + "?" if len(rest) == 1 else "anyOf"
    kind = node.get("type")
    null = "?" if isinstance(kind, list) and "null" in kind else ""
    if "enum" in node:
        return "|".join(str(v) for v in node["enum"] if v is not None) + null
    if "properties" in node:
        return "{" + ", ".join(f"{k}: {_summary(v)}" for k, v in node["properties"].items()) + "}" + null
    if "items" in node:
        return f"[{_summary(node['items'])}]{null}"
    names = [t for t in kind if t != "null"] if isinstance(kind, list) else [kind]
    return "|".join(str(t) for t in names) + null


def _check_choice(choice: list[str]) -> None:
    if not choice or any(not c for c in choice):
        raise ValueError("task.format.choice: give one or more non-empty strings")
    if len(set(choice)) != len(choice):
        raise ValueError("task.format.choice: choices must be distinct")


def _check_regex(pattern: str) -> None:
    if not pattern:
        raise ValueError("task.format.regex: empty pattern")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"task.format.regex: not a valid regular expression ({exc})") from None
    if re.search(r"(?<!\\)\\[AZz]", pattern):  # the grammar reads them as the letters A, Z, z
        raise ValueError(
            "task.format.regex: \\A, \\Z and \\z are not supported (the whole output must match)"
        )


def _ebnf_literal(text: str) -> str:
    """An EBNF string literal: JSON escapes, which the grammar's literals read the same way."""
    return json.dumps(text, ensure_ascii=False)


# ---- field lists ------------------------------------------------------------------------


def compile_fields(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """A field list (see the module docstring) as a JSON schema object."""
    if not fields:
        raise ValueError(f"{where}: needs at least one field")
    props: dict[str, Any] = {}
    for name, value in fields.items():
        _check_name(name, where)
        props[name] = _field(value, f"{where}.{name}")
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _field(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return compile_fields(value, where)
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], dict):
            return {"type": "array", "items": compile_fields(value[0], where)}
        labels = [v for v in value if v is not None]
        if not labels or not all(isinstance(v, str) and v for v in labels) or len(set(labels)) < len(labels):
            raise ValueError(f"{where}: an enum is a list of distinct non-empty strings (null: nullable)")
        enum: dict[str, Any] = {"type": "string", "enum": labels}
        return _nullable(enum) if None in value else enum
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a type name, a list (enum) or a mapping, got {value!r}")
    text = value.strip()
    optional = text.endswith("?")
    text = text.removesuffix("?").strip()
    if m := re.fullmatch(r"list\[\s*(\w+)\s*\]", text):
        out = {"type": "array", "items": {"type": _scalar(m.group(1), where)}}
    else:
        out = {"type": _scalar(text, where)}
    return _nullable(out) if optional else out


def _scalar(name: str, where: str) -> str:
    if name not in SCALARS:
        raise ValueError(f"{where}: unknown type {name!r} (use {', '.join(sorted(SCALARS))}, list[T])")
    return SCALARS[name]


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not IDENTIFIER.match(name):
        raise ValueError(
            f"{where}: field name {name!r} is not a safe identifier (letters, digits and underscores)"
        )


# ---- JSON schemas -----------------------------------------------------------------------


def check_schema(schema: Any, where: str) -> None:
    """A valid JSON schema (Draft 2020-12) made of supported constructs, with a typed column."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise ValueError(f"{where}: must be a JSON object")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        at = ".".join(str(p) for p in exc.path)
        raise ValueError(f"{where}: invalid JSON schema{f' at {at}' if at else ''}: {exc.message}") from None
    type_tree(schema, where)


def _path(where: str, path: str) -> str:
    return f"{where} at {path}" if path else where


def type_tree(schema: dict[str, Any], where: str, path: str = "") -> TypeTree:
    """The one column type a schema node maps to; unsupported constructs raise, naming their path."""
    if not isinstance(schema, dict):
        raise ValueError(f"{_path(where, path)}: a schema must be an object")
    unknown = sorted(set(schema) - KEYWORDS)
    if unknown:
        raise ValueError(f"{_path(where, path)}: unsupported keyword {unknown[0]!r}")
    if "anyOf" in schema:
        return _any_of(schema, where, path)
    kind = schema.get("type")
    if isinstance(kind, list):
        rest = [t for t in kind if t != "null"]
        if len(rest) != 1:
            raise ValueError(f"{_path(where, path)}: a type list must be one type, optionally with 'null'")
        kind = rest[0]
    if kind is None:
        kind = _implied_type(schema, where, path)
    if kind == "object":
        props = schema.get("properties")
        if not props:
            raise ValueError(f"{_path(where, path)}: an object needs 'properties' (maps are not supported)")
        if schema.get("additionalProperties", False) is not False:
            raise ValueError(f"{_path(where, path)}: 'additionalProperties' must be false (or left out)")
        unknown = [n for n in schema.get("required", []) if n not in props]
        if unknown:
            raise ValueError(
                f"{_path(where, path)}: 'required' names {unknown[0]!r}, not among its properties"
            )
        fields = []
        for name, sub in props.items():
            _check_name(name, _path(where, path))
            fields.append((name, type_tree(sub, where, f"{path}.{name}" if path else name)))
        return ("struct", tuple(fields))
    if kind == "array":
        if not isinstance(schema.get("items"), dict):
            raise ValueError(f"{_path(where, path)}: an array needs one 'items' schema")
        return ("list", type_tree(schema["items"], where, f"{path}[]"))
    if kind in ("string", "integer", "number", "boolean"):
        return (kind,)
    raise ValueError(f"{_path(where, path)}: unsupported type {kind!r}")


def _any_of(schema: dict[str, Any], where: str, path: str) -> TypeTree:
    """anyOf is supported only as 'one schema or null' (a nullable value)."""
    options = schema["anyOf"]
    rest = [o for o in options if o != {"type": "null"}]
    if len(rest) != 1 or len(options) > 2 or set(schema) - {"anyOf", "title", "description"}:
        raise ValueError(f"{_path(where, path)}: 'anyOf' is supported only as [schema, {{type: null}}]")
    return type_tree(rest[0], where, path)


def _implied_type(schema: dict[str, Any], where: str, path: str) -> str:
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values:
        kinds = {_value_type(v) for v in values if v is not None}
        if len(kinds) == 1:
            return kinds.pop()
    raise ValueError(f"{_path(where, path)}: give a 'type' (or enum values of one type)")


def _value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "null")
