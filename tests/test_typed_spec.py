"""Typed output specs (``task.format``): shapes compile to schemas, bad ones fail naming the field,
before any model loads; outputs parse into typed values or row errors."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from batchllm import job
from batchllm.shape import FormatSpec
from batchllm.spec import SpecError, parse_spec
from batchllm.typed import parse, typed_columns, typed_fields
from tests.product_fixtures import make_reviews_db, spec_dict

FIELDS = {
    "sentiment": ["positive", "negative", "mixed"],
    "mentions_acting": "bool",
    "summary": "str?",
    "score": "float",
    "tags": "list[str]",
    "cast": [{"name": "str", "age": "int?"}],
    "studio": {"name": "str", "city": ["paris", "rome", None]},
}


def _spec(db: Path, fmt: dict, **task) -> dict:
    return spec_dict(db, task={"kind": "generate", "format": fmt, **task}, output={"table": "facts"})


def test_field_list_compiles_to_a_typed_schema(tmp_path: Path) -> None:
    spec = parse_spec(_spec(tmp_path / "w.duckdb", {"fields": FIELDS}))
    fmt = spec.task.format
    schema = fmt.schema()
    assert schema["required"] == list(FIELDS) and schema["additionalProperties"] is False
    assert schema["properties"]["summary"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert fmt.describe().startswith("fields (STRUCT parsed): {sentiment: positive|negative|mixed, mentions")
    assert (
        "summary: string?, score: number, tags: [string], cast: [{name: string, age: integer?}]"
        in fmt.describe()
    )
    [field] = typed_fields(fmt)
    assert field.name == "parsed"
    assert field.type == pa.struct(
        [
            ("sentiment", pa.string()),
            ("mentions_acting", pa.bool_()),
            ("summary", pa.string()),
            ("score", pa.float64()),
            ("tags", pa.list_(pa.string())),
            ("cast", pa.list_(pa.struct([("name", pa.string()), ("age", pa.int64())]))),
            ("studio", pa.struct([("name", pa.string()), ("city", pa.string())])),
        ]
    )


def test_params_hash_includes_the_format(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    a = parse_spec(_spec(db, {"fields": {"x": "int"}}))
    b = parse_spec(_spec(db, {"fields": {"x": "float"}}))
    c = parse_spec(spec_dict(db, task={"kind": "generate"}, output={"table": "facts"}))
    assert len({a.params_hash, b.params_hash, c.params_hash}) == 3
    # the fields' order is the order the model writes them in: another job, whatever sorted dumps say
    d = parse_spec(_spec(db, {"fields": {"reason": "str", "answer": "int"}}))
    e = parse_spec(_spec(db, {"fields": {"answer": "int", "reason": "str"}}))
    assert d.params_hash != e.params_hash and d.spec_hash != e.spec_hash


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (
            {"fields": {"my-field": "str"}},
            "task.format.fields: field name 'my-field' is not a safe identifier",
        ),
        ({"fields": {"a": {"b c": "int"}}}, "task.format.fields.a: field name 'b c'"),
        ({"fields": {"a": "text"}}, "task.format.fields.a: unknown type 'text'"),
        ({"fields": {"a": ["x", "x"]}}, "task.format.fields.a: an enum is a list of distinct"),
        ({"fields": {}}, "task.format.fields: needs at least one field"),
        ({"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "invalid JSON schema"),
        ({"json_schema": "{not json"}, "task.format.json_schema: not valid JSON"),
        (
            {"json_schema": {"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}},
            "task.format.json_schema at a: unsupported keyword 'oneOf'",
        ),
        ({"json_schema": {"type": "object"}}, "an object needs 'properties'"),
        ({"json_schema": {"$ref": "#/$defs/x"}}, "unsupported keyword '\\$ref'"),
        ({"json_schema": {"type": "array"}}, "an array needs one 'items' schema"),
        (
            {"json_schema": {"type": "object", "properties": {"a-b": {"type": "string"}}}},
            "not a safe identifier",
        ),
        ({"choice": []}, "task.format.choice: give one or more"),
        ({"choice": ["a", "a"]}, "task.format.choice: choices must be distinct"),
        ({"regex": "(unclosed"}, "task.format.regex: not a valid regular expression"),
        ({"regex": "abc\\Z"}, "z are not supported"),
        (
            {
                "json_schema": {
                    "type": "object",
                    "properties": {"sentiment": {"type": "string"}},
                    "required": ["sentimnet"],
                }
            },
            "task.format.json_schema: 'required' names 'sentimnet', not among its properties",
        ),
        ({"regex": "a", "choice": ["a"]}, "task.format: give exactly one of"),
        ({"choice": ["a"], "columns": "flat"}, "task.format.columns: 'flat' needs an object output"),
        ({"choice": ["a"], "layout": "x"}, "task.format.layout: unknown field"),
    ],
)
def test_bad_formats_name_the_field(tmp_path: Path, fmt: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_spec(_spec(tmp_path / "w.duckdb", fmt))


def test_format_only_with_generate(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"task\.format: only used with kind 'generate'"):
        parse_spec(_spec(tmp_path / "w.duckdb", {"choice": ["a"]}, kind="classify", labels=["a", "b"]))


def test_checks_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat columns that would replace result columns, and grammars the library refuses."""
    db = make_reviews_db(tmp_path / "w.duckdb", 3)
    monkeypatch.setattr(job, "create_backend", lambda *a, **k: pytest.fail("the model was loaded"))
    spec = parse_spec(_spec(db, {"fields": {"status": "str", "x": "int"}, "columns": "flat"}))
    with pytest.raises(SpecError, match=r"task\.format: field 'status' would replace the results column"):
        job.check(spec)
    spec = parse_spec(_spec(db, {"fields": {"a": "bool", "A": "int"}, "columns": "flat"}))
    with pytest.raises(SpecError, match=r"task\.format: fields 'a' and 'A' would be one column"):
        job.check(spec)
    spec = parse_spec(_spec(db, {"regex": r"(a)\1"}))
    with pytest.raises(SpecError, match=r"task\.format\.regex: the grammar cannot be built: .*Backreference"):
        job.check(spec)
    job.check(parse_spec(_spec(db, {"fields": FIELDS})))  # a good one passes


def test_outputs_parse_into_typed_values_or_errors() -> None:
    fmt = FormatSpec(fields={"n": "int", "x": "float", "tags": "list[str]", "who": "str?"}, columns="flat")
    texts = [
        '{"n": 1.0, "x": 2, "tags": ["a"], "who": null}',
        '{"n": 1, "x": 2.5, "tags": [',
        '{"n": "1", "x": 2.5, "tags": [], "who": "z"}',
        None,
        '{"n": 123456789012345678901234567890, "x": 1, "tags": [], "who": null}',  # valid, beyond int64
    ]
    columns, errors = typed_columns(fmt, texts, ["stop", "length", "stop", "error", "stop"])
    assert errors[0] is None and errors[3] is None
    assert "cut by max_tokens" in errors[1]
    assert "does not match the schema at n" in errors[2]
    assert "does not fit its column type struct<n: int64" in errors[4]
    assert columns["n"].to_pylist() == [1, None, None, None, None]
    assert columns["x"].to_pylist() == [2.0, None, None, None, None]
    assert columns["tags"].type == pa.list_(pa.string())
    choice = FormatSpec(choice=["yes", "no"])
    assert parse(choice, "yes", "stop") == ("yes", None)
    assert (
        parse(choice, "ye", "length")[1]
        == "format: output 'ye' is not one of the choices (cut by max_tokens before the value was complete)"
    )


def test_answers_the_grammar_allows_parse_or_become_row_errors(tmp_path: Path) -> None:
    """'.' in a regex matches a newline in the grammar, so in the check too; a schema-valid value that
    no column holds (a lone surrogate, a number beyond a float) is that row's error, not the run's."""
    from batchllm.typed import parse

    regex = parse_spec(_spec(tmp_path / "w.duckdb", {"regex": "Steps: .{3,20}"})).task.format
    assert parse(regex, "Steps: one,\ntwo", "stop") == ("Steps: one,\ntwo", None)
    fmt = parse_spec(_spec(tmp_path / "w.duckdb", {"fields": {"name": "str", "rating": "float"}})).task.format
    for text in ['{"name": "\\ud83d", "rating": 1}', '{"name": "x", "rating": 1' + "0" * 320 + "}"]:
        value, error = parse(fmt, text, "stop")
        assert value is None and error is not None and "does not fit its column type" in error, error
    assert parse(fmt, '{"name": "x", "rating": 2}', "stop") == ({"name": "x", "rating": 2.0}, None)
